//! Kubernetes manifests for a fleet of an exported template (the
//! `k8s-openapi` types of the Kubernetes version `kubernetes-validate`
//! checks against in the tests).
//!
//! A StatefulSet gives each SSH container a stable name and two volumes
//! of its own, its host keys (`/etc/dropbear`, made by Dropbear at the
//! first connection and kept across rescheduling) and its homes (`/home`,
//! seeded from the image by an init container). The login user's
//! `authorized_keys` comes from a Secret. The pod runs in a user
//! namespace (`hostUsers: false`, as nifty does), with the capabilities
//! nifty keeps and no others, the runtime's seccomp profile and no
//! privilege escalation. A headless Service names the pods; with
//! `--expose`, a NodePort or LoadBalancer Service per pod reaches each
//! one's SSH port from outside the cluster.

use std::collections::BTreeMap;

use k8s_openapi::api::apps::v1::{Deployment, DeploymentSpec, StatefulSet, StatefulSetSpec};
use k8s_openapi::api::core::v1::{
    Capabilities, Container, ContainerPort, EnvVar, PersistentVolumeClaim,
    PersistentVolumeClaimSpec, PodSpec, PodTemplateSpec, Probe, SeccompProfile, Secret,
    SecretVolumeSource, SecurityContext, Service, ServicePort, ServiceSpec, TCPSocketAction,
    Volume, VolumeMount, VolumeResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{LabelSelector, ObjectMeta};
use k8s_openapi::apimachinery::pkg::util::intstr::IntOrString;
use k8s_openapi::ByteString;

use crate::runtime::linux::confine::KEEP;
use crate::template::inittab::PORT_ENV;
use crate::{Error, Result};

/// How each pod's SSH port is reached from outside.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expose {
    NodePort,
    LoadBalancer,
    None,
}

/// The workload that runs the pods.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Workload {
    /// Stable names and a volume per pod for host keys and homes.
    StatefulSet,
    /// Interchangeable pods with nothing kept (what `podman kube play` runs).
    Deployment,
}

/// What the manifests are for.
#[derive(Debug, Clone)]
pub struct Fleet {
    /// The name of the workload and its Services (`nifty-<template>`).
    pub name: String,
    pub image: String,
    pub replicas: u32,
    pub expose: Expose,
    pub workload: Workload,
    /// The image's login user.
    pub user: String,
    /// Lines of the login user's authorized_keys.
    pub authorized_keys: Vec<String>,
}

/// The SSH port inside each pod.
pub const SSH_PORT: i32 = 22;

/// The manifests, as one YAML stream.
pub fn manifests(f: &Fleet) -> Result<String> {
    let labels = BTreeMap::from([
        ("app.kubernetes.io/name".to_string(), f.name.clone()),
        (
            "app.kubernetes.io/managed-by".to_string(),
            "nifty".to_string(),
        ),
    ]);
    let meta = |name: &str| ObjectMeta {
        name: Some(name.to_string()),
        labels: Some(labels.clone()),
        ..Default::default()
    };
    let secret_name = format!("{}-authorized-keys", f.name);
    let mut docs = vec![yaml(&Secret {
        metadata: meta(&secret_name),
        // `data`, not `stringData`: podman kube play reads only `data`.
        data: Some(BTreeMap::from([(
            "authorized_keys".to_string(),
            ByteString(format!("{}\n", f.authorized_keys.join("\n")).into_bytes()),
        )])),
        ..Default::default()
    })?];
    let ssh_port = |node_port: bool| ServicePort {
        name: Some("ssh".into()),
        port: SSH_PORT,
        target_port: Some(IntOrString::Int(SSH_PORT)),
        protocol: Some("TCP".into()),
        node_port: None,
        app_protocol: node_port.then(|| "ssh".to_string()),
    };
    docs.push(yaml(&Service {
        metadata: meta(&f.name),
        spec: Some(ServiceSpec {
            cluster_ip: Some("None".into()),
            selector: Some(labels.clone()),
            ports: Some(vec![ssh_port(false)]),
            publish_not_ready_addresses: Some(true),
            ..Default::default()
        }),
        ..Default::default()
    })?);

    let pod = pod_spec(f, &secret_name);
    let template = PodTemplateSpec {
        metadata: Some(ObjectMeta {
            labels: Some(labels.clone()),
            ..Default::default()
        }),
        spec: Some(pod),
    };
    let selector = LabelSelector {
        match_labels: Some(labels.clone()),
        ..Default::default()
    };
    match f.workload {
        Workload::StatefulSet => {
            let claim = |name: &str, size: &str| PersistentVolumeClaim {
                metadata: ObjectMeta {
                    name: Some(name.to_string()),
                    ..Default::default()
                },
                spec: Some(PersistentVolumeClaimSpec {
                    access_modes: Some(vec!["ReadWriteOnce".into()]),
                    resources: Some(VolumeResourceRequirements {
                        requests: Some(BTreeMap::from([(
                            "storage".to_string(),
                            Quantity(size.to_string()),
                        )])),
                        ..Default::default()
                    }),
                    ..Default::default()
                }),
                ..Default::default()
            };
            docs.push(yaml(&StatefulSet {
                metadata: meta(&f.name),
                spec: StatefulSetSpec {
                    service_name: Some(f.name.clone()),
                    replicas: Some(f.replicas as i32),
                    pod_management_policy: Some("Parallel".into()),
                    selector,
                    template,
                    volume_claim_templates: Some(vec![
                        claim("hostkeys", "16Mi"),
                        claim("home", "1Gi"),
                    ]),
                    ..Default::default()
                },
                ..Default::default()
            })?);
            if f.expose != Expose::None {
                for i in 0..f.replicas {
                    let pod = format!("{}-{i}", f.name);
                    let mut sel = labels.clone();
                    sel.insert("statefulset.kubernetes.io/pod-name".into(), pod.clone());
                    docs.push(yaml(&Service {
                        metadata: meta(&format!("{pod}-ssh")),
                        spec: Some(ServiceSpec {
                            type_: Some(
                                match f.expose {
                                    Expose::LoadBalancer => "LoadBalancer",
                                    _ => "NodePort",
                                }
                                .into(),
                            ),
                            selector: Some(sel),
                            ports: Some(vec![ssh_port(true)]),
                            ..Default::default()
                        }),
                        ..Default::default()
                    })?);
                }
            }
        }
        Workload::Deployment => {
            if f.expose != Expose::None {
                return Err(Error::Invalid(
                    "--workload deployment: its pods have no stable names, so no Service can reach one pod's SSH; use --expose none, or the StatefulSet".into(),
                ));
            }
            docs.push(yaml(&Deployment {
                metadata: meta(&f.name),
                spec: DeploymentSpec {
                    replicas: Some(f.replicas as i32),
                    selector,
                    template,
                    ..Default::default()
                },
                ..Default::default()
            })?);
        }
    }
    Ok(docs.join("---\n"))
}

/// The pod: an init container that seeds `/home` and installs the keys,
/// and the SSH container.
fn pod_spec(f: &Fleet, secret_name: &str) -> PodSpec {
    let security = SecurityContext {
        allow_privilege_escalation: Some(false),
        capabilities: Some(Capabilities {
            drop: Some(vec!["ALL".into()]),
            add: Some(
                KEEP.iter()
                    .map(|(_, n)| n.trim_start_matches("CAP_").to_string())
                    .collect(),
            ),
        }),
        seccomp_profile: Some(SeccompProfile {
            type_: "RuntimeDefault".into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    let mount = |name: &str, path: &str, ro: bool| VolumeMount {
        name: name.into(),
        mount_path: path.into(),
        read_only: ro.then_some(true),
        ..Default::default()
    };
    let user = &f.user;
    // Puts the Secret's keys in the user's authorized_keys (every start);
    // `root` is where the home volume is mounted. Key lines hold spaces;
    // a file without any is the Secret's base64, as podman 4.3's kube play
    // leaves it.
    let keys = |root: &str| {
        format!(
        "h={root}$(awk -F: '$1 == \"{user}\" {{ print $6 }}' /etc/passwd)\n\
         mkdir -p $h/.ssh\n\
         k=/run/nifty/keys/authorized_keys\n\
         if grep -q ' ' $k; then cp $k $h/.ssh/authorized_keys; else base64 -d < $k > $h/.ssh/authorized_keys; fi\n\
         chown $(id -u {user}):$(id -g {user}) $h $h/.ssh $h/.ssh/authorized_keys\n\
         chmod 700 $h $h/.ssh\n\
         chmod 600 $h/.ssh/authorized_keys\n"
    )
    };
    let secret = Volume {
        name: "authorized-keys".into(),
        secret: Some(SecretVolumeSource {
            secret_name: Some(secret_name.into()),
            default_mode: Some(0o444),
            // Said, not left out: podman 4.3's kube play needs it.
            optional: Some(false),
            ..Default::default()
        }),
        ..Default::default()
    };
    let keys_mount = mount("authorized-keys", "/run/nifty/keys", true);
    let ssh = Container {
        name: "ssh".into(),
        image: Some(f.image.clone()),
        env: Some(vec![EnvVar {
            name: PORT_ENV.into(),
            value: Some(SSH_PORT.to_string()),
            ..Default::default()
        }]),
        ports: Some(vec![ContainerPort {
            name: Some("ssh".into()),
            container_port: SSH_PORT,
            protocol: Some("TCP".into()),
            ..Default::default()
        }]),
        readiness_probe: Some(Probe {
            tcp_socket: Some(TCPSocketAction {
                port: IntOrString::Int(SSH_PORT),
                ..Default::default()
            }),
            period_seconds: Some(10),
            ..Default::default()
        }),
        security_context: Some(security.clone()),
        ..Default::default()
    };
    let base = PodSpec {
        host_users: Some(false),
        automount_service_account_token: Some(false),
        enable_service_links: Some(false),
        // BusyBox init's poweroff (the image's StopSignal) takes about 3 s.
        termination_grace_period_seconds: Some(15),
        ..Default::default()
    };
    match f.workload {
        // Volumes of its own for host keys and homes; an init container
        // seeds the home volume from the image the first time (a volume
        // hides the image's /home) and installs the keys.
        Workload::StatefulSet => PodSpec {
            init_containers: Some(vec![Container {
                name: "seed-home".into(),
                image: Some(f.image.clone()),
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!(
                        "set -e\n\
                         [ -e /mnt/home/.nifty-seeded ] || {{ cp -a /home/. /mnt/home/ && touch /mnt/home/.nifty-seeded; }}\n{}",
                        keys("/mnt")
                    ),
                ]),
                volume_mounts: Some(vec![mount("home", "/mnt/home", false), keys_mount]),
                security_context: Some(security),
                ..Default::default()
            }]),
            containers: vec![Container {
                volume_mounts: Some(vec![
                    mount("hostkeys", "/etc/dropbear", false),
                    mount("home", "/home", false),
                ]),
                ..ssh
            }],
            volumes: Some(vec![secret]),
            ..base
        },
        // Nothing kept: the keys are installed in the container's own
        // layer, then BusyBox init takes over as PID 1. (No init
        // container: podman 4.3 restarts those under restartPolicy Always.)
        Workload::Deployment => PodSpec {
            containers: vec![Container {
                // No containerPort: podman 4.3's kube play publishes one on
                // the host, so a second replica could not start (in
                // Kubernetes the list is only informational).
                ports: None,
                command: Some(vec![
                    "/bin/sh".into(),
                    "-c".into(),
                    format!("set -e\n{}exec /sbin/init\n", keys("")),
                ]),
                volume_mounts: Some(vec![keys_mount]),
                ..ssh
            }],
            volumes: Some(vec![secret]),
            ..base
        },
    }
}

fn yaml<T: serde::Serialize>(doc: &T) -> Result<String> {
    serde_norway::to_string(doc).map_err(|e| Error::Invalid(format!("a Kubernetes manifest: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fleet(workload: Workload, expose: Expose) -> Fleet {
        Fleet {
            name: "nifty-default".into(),
            image: "localhost/nifty-default:v1".into(),
            replicas: 3,
            expose,
            workload,
            user: "luser".into(),
            authorized_keys: vec!["ssh-ed25519 AAAA test".into()],
        }
    }

    #[test]
    fn a_statefulset_with_a_service_per_pod() {
        let y = manifests(&fleet(Workload::StatefulSet, Expose::NodePort)).unwrap();
        let docs: Vec<serde_json::Value> = y
            .split("---\n")
            .map(|d| serde_norway::from_str(d).unwrap())
            .collect();
        let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
        assert_eq!(
            kinds,
            [
                "Secret",
                "Service",
                "StatefulSet",
                "Service",
                "Service",
                "Service"
            ]
        );
        let sts = &docs[2];
        let pod = &sts["spec"]["template"]["spec"];
        assert_eq!(pod["hostUsers"], false);
        let caps = &pod["containers"][0]["securityContext"]["capabilities"];
        assert_eq!(caps["drop"][0], "ALL");
        assert!(caps["add"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "SETUID"));
        assert!(!caps["add"]
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c == "SYS_ADMIN"));
        assert_eq!(
            sts["spec"]["volumeClaimTemplates"]
                .as_array()
                .unwrap()
                .len(),
            2
        );
        assert_eq!(
            docs[5]["spec"]["selector"]["statefulset.kubernetes.io/pod-name"],
            "nifty-default-2"
        );
        assert_eq!(docs[5]["spec"]["type"], "NodePort");
    }

    #[test]
    fn a_deployment_cannot_expose_one_pod() {
        let e = manifests(&fleet(Workload::Deployment, Expose::NodePort)).unwrap_err();
        assert!(e.to_string().contains("--expose none"), "{e}");
        let y = manifests(&fleet(Workload::Deployment, Expose::None)).unwrap();
        assert!(
            y.contains("kind: Deployment") && y.contains("exec /sbin/init"),
            "{y}"
        );
    }
}
