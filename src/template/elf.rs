//! Shared-library resolution from ELF headers (DT_NEEDED, RPATH/RUNPATH,
//! ld.so.conf, PT_INTERP), via the `lddtree` crate: no `ldd`, which would
//! run the binary's own loader.

use std::path::{Path, PathBuf};

use crate::{Error, Result};

/// What a binary needs at run time.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Needs {
    /// The dynamic loader (PT_INTERP), if the binary is dynamic.
    pub interpreter: Option<PathBuf>,
    /// Every shared library, transitively, as the host path it was found at.
    pub libraries: Vec<PathBuf>,
}

impl Needs {
    /// Is the binary statically linked?
    pub fn is_static(&self) -> bool {
        self.interpreter.is_none() && self.libraries.is_empty()
    }
}

/// Fails unless `path` is a readable ELF file.
pub fn check_elf(what: &str, path: &Path) -> Result<()> {
    use std::io::Read;
    let mut magic = [0u8; 4];
    let mut f = std::fs::File::open(path)
        .map_err(|e| Error::Invalid(format!("{what} {}: {e}", path.display())))?;
    if f.read_exact(&mut magic).is_err() || &magic != b"\x7fELF" {
        return Err(Error::Invalid(format!(
            "{what} {}: not an ELF executable; give the path of a real binary",
            path.display()
        )));
    }
    Ok(())
}

/// Resolves the libraries of `path` against the host's root.
pub fn resolve(path: &Path) -> Result<Needs> {
    check_elf("binary", path)?;
    let tree = lddtree::DependencyAnalyzer::new("/".into())
        .analyze(path)
        .map_err(|e| {
            Error::Invalid(format!(
                "{}: cannot read its ELF headers: {e}",
                path.display()
            ))
        })?;
    let mut needs = Needs {
        interpreter: tree.interpreter.as_ref().map(PathBuf::from),
        libraries: Vec::new(),
    };
    for (name, lib) in &tree.libraries {
        if Some(name.as_str()) == tree.interpreter.as_deref() {
            continue;
        }
        if !lib.found() {
            return Err(Error::Invalid(format!(
                "{}: shared library {name} cannot be found on this host; install the package that provides it",
                path.display()
            )));
        }
        needs.libraries.push(lib.path.clone());
    }
    needs.libraries.sort();
    if let Some(i) = &needs.interpreter {
        if !i.exists() {
            return Err(Error::Invalid(format!(
                "{}: its dynamic loader {} does not exist on this host",
                path.display(),
                i.display()
            )));
        }
    }
    Ok(needs)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn resolves_a_real_dynamic_binary() {
        // /bin/ls is dynamic on every Debian host and needs libc.
        let n = resolve(Path::new("/bin/ls")).unwrap();
        assert!(!n.is_static());
        let interp = n.interpreter.unwrap();
        assert!(interp.exists(), "{}", interp.display());
        assert!(
            n.libraries.iter().any(|l| l
                .file_name()
                .unwrap()
                .to_string_lossy()
                .starts_with("libc.so")),
            "{:?}",
            n.libraries
        );
        assert!(n.libraries.iter().all(|l| l.exists()));
    }

    #[test]
    fn refuses_non_elf() {
        let e = resolve(Path::new("/etc/passwd")).unwrap_err().to_string();
        assert!(e.contains("not an ELF executable"), "{e}");
        let e = resolve(Path::new("/nonexistent/bin"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("/nonexistent/bin"), "{e}");
    }
}
