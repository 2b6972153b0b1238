//! A Compose file (the Compose Specification, read by podman-compose and
//! docker compose) for a fleet of an exported template on one host
//! without nifty: service `nifty-N` publishes its SSH port on host port
//! PORT_BASE + N, as nifty's instance N would listen, with named volumes
//! for its host keys and homes (filled from the image the first time),
//! the capabilities nifty keeps and no privilege escalation.

use std::collections::BTreeMap;

use serde::Serialize;

use crate::runtime::linux::confine::KEEP;
use crate::template::inittab::PORT_ENV;
use crate::{Error, Result};

#[derive(Serialize)]
struct Compose {
    services: BTreeMap<String, Service>,
    volumes: BTreeMap<String, Named>,
}

#[derive(Serialize)]
struct Service {
    image: String,
    hostname: String,
    environment: BTreeMap<String, String>,
    ports: Vec<Port>,
    volumes: Vec<String>,
    cap_drop: Vec<String>,
    cap_add: Vec<String>,
    security_opt: Vec<String>,
    stop_signal: String,
    stop_grace_period: String,
    restart: String,
}

/// The long form: `2201:22` unquoted is a base-60 number to YAML 1.1
/// readers (PyYAML, so podman-compose).
#[derive(Serialize)]
struct Port {
    target: u16,
    published: u32,
    protocol: &'static str,
}

#[derive(Serialize)]
struct Named {}

/// The Compose file for `replicas` containers of `image`, instance N on
/// host port `port_base + N`.
pub fn compose(image: &str, replicas: u32, port_base: u16) -> Result<String> {
    if u32::from(port_base) + replicas > u32::from(u16::MAX) {
        return Err(Error::Invalid(format!(
            "--replicas {replicas} from port base {port_base} runs past port 65535"
        )));
    }
    let mut services = BTreeMap::new();
    let mut volumes = BTreeMap::new();
    for n in 1..=replicas {
        let name = format!("nifty-{n}");
        let (keys, home) = (format!("{name}-hostkeys"), format!("{name}-home"));
        services.insert(
            name.clone(),
            Service {
                image: image.to_string(),
                hostname: name.clone(),
                environment: BTreeMap::from([(PORT_ENV.to_string(), "22".to_string())]),
                ports: vec![Port {
                    target: 22,
                    published: u32::from(port_base) + n,
                    protocol: "tcp",
                }],
                volumes: vec![format!("{keys}:/etc/dropbear"), format!("{home}:/home")],
                cap_drop: vec!["ALL".into()],
                cap_add: KEEP
                    .iter()
                    .map(|(_, c)| c.trim_start_matches("CAP_").to_string())
                    .collect(),
                security_opt: vec!["no-new-privileges".into()],
                stop_signal: super::oci::STOP_SIGNAL.into(),
                stop_grace_period: "15s".into(),
                restart: "unless-stopped".into(),
            },
        );
        volumes.insert(keys, Named {});
        volumes.insert(home, Named {});
    }
    serde_norway::to_string(&Compose { services, volumes })
        .map_err(|e| Error::Invalid(format!("a Compose file: {e}")))
}

#[cfg(test)]
mod tests {
    #[test]
    fn one_service_per_instance_on_its_port() {
        let y = super::compose("localhost/nifty-default:v1", 2, 2200).unwrap();
        let v: serde_json::Value = serde_norway::from_str(&y).unwrap();
        assert_eq!(v["services"]["nifty-2"]["ports"][0]["published"], 2202);
        assert_eq!(
            v["services"]["nifty-1"]["volumes"][0],
            "nifty-1-hostkeys:/etc/dropbear"
        );
        assert!(v["volumes"]["nifty-2-home"].is_object());
        assert!(super::compose("x", 10, 65530).is_err());
    }
}
