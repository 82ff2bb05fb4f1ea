//! The emulator's own certificate authority and its server certificate.
//!
//! The CA's key and certificate are kept in the TLS directory and reused on the next start,
//! so a client that trusts `ca.crt` keeps trusting a restarted emulator. The server
//! certificate (127.0.0.1, ::1, localhost) is minted fresh at every start.
//!
//! Whoever can write the directory can plant a CA key the emulator would then serve with,
//! and whoever can read `ca.key` can impersonate the emulator: the directory is private to
//! this user, either a fresh one per process ([`PrivateTempDir`]) or one given explicitly
//! that is checked ([`prepare`]).

use std::fs::DirBuilder;
use std::io::Read as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};

pub struct Tls {
    /// The CA certificate (PEM) clients must trust; also written to `DIR/ca.crt`.
    pub ca_pem: String,
    pub config: Arc<rustls::ServerConfig>,
}

/// Both are regenerated identically on every start: an issuer is its name, key-id method and
/// usages, so a reloaded CA key signs certificates that chain to the stored `ca.crt`.
fn ca_params() -> CertificateParams {
    let mut params = CertificateParams::default();
    params
        .distinguished_name
        .push(DnType::CommonName, "acs-emulator local CA");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params
}

/// A directory of this process's own for the CA: a fresh random name under the system's
/// temporary directory, created (never reused) with mode 0700, removed when dropped.
pub struct PrivateTempDir(PathBuf);

impl PrivateTempDir {
    pub fn create() -> anyhow::Result<Self> {
        let path =
            std::env::temp_dir().join(format!("acs-emulator-tls-{:032x}", rand::random::<u128>()));
        // Not recursive: a path that already exists is an error, never adopted.
        private_dir_builder()
            .create(&path)
            .with_context(|| format!("creating {}", path.display()))?;
        Ok(Self(path))
    }

    pub fn path(&self) -> &Path {
        &self.0
    }
}

impl Drop for PrivateTempDir {
    fn drop(&mut self) {
        if let Err(e) = std::fs::remove_dir_all(&self.0) {
            tracing::warn!("removing {} failed: {e}", self.0.display());
        }
    }
}

fn private_dir_builder() -> DirBuilder {
    let mut builder = DirBuilder::new();
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder
}

/// Creates `dir` (and missing parents) with mode 0700, or refuses an existing one that group
/// or others may write.
fn ensure_private_dir(dir: &Path) -> anyhow::Result<()> {
    private_dir_builder()
        .recursive(true)
        .create(dir)
        .with_context(|| format!("creating {}", dir.display()))?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        let mode = std::fs::metadata(dir)
            .with_context(|| format!("reading the mode of {}", dir.display()))?
            .permissions()
            .mode();
        if mode & 0o022 != 0 {
            anyhow::bail!(
                "the TLS directory {} is writable by group or others (mode {:o}), so another user could plant a CA key in it; `chmod go-w` it or choose another --tls-dir",
                dir.display(),
                mode & 0o7777
            );
        }
    }
    Ok(())
}

/// The PEM of an existing CA key, refused if group or others may read or write it.
fn read_ca_key(path: &Path) -> anyhow::Result<Option<String>> {
    let mut file = match std::fs::File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("opening {}", path.display())),
    };
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt as _;
        // The mode of the opened file: it cannot be swapped between the check and the read.
        let mode = file
            .metadata()
            .with_context(|| format!("reading the mode of {}", path.display()))?
            .permissions()
            .mode();
        if mode & 0o077 != 0 {
            anyhow::bail!(
                "{} is readable or writable by group or others (mode {:o}); `chmod 600` it, or delete it for a new CA",
                path.display(),
                mode & 0o7777
            );
        }
    }
    let mut pem = String::new();
    file.read_to_string(&mut pem)
        .with_context(|| format!("reading {}", path.display()))?;
    Ok(Some(pem))
}

/// Loads or creates the CA in `dir` (writing `ca.crt` and `ca.key`), then mints a server
/// certificate signed by it. `dir` is created private if missing; one that others may write,
/// or whose `ca.key` others may read, is refused.
pub fn prepare(dir: &Path) -> anyhow::Result<Tls> {
    ensure_private_dir(dir)?;
    let crt_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    let existing = match (std::fs::read_to_string(&crt_path), read_ca_key(&key_path)?) {
        (Ok(crt), Some(key)) => KeyPair::from_pem(&key).ok().map(|key| (crt, key)),
        _ => None,
    };
    let (ca_pem, ca_key) = match existing {
        Some(found) => found,
        None => {
            let key = KeyPair::generate().context("generating the CA key")?;
            let cert = ca_params()
                .self_signed(&key)
                .context("self-signing the CA")?;
            write_private(&key_path, &key.serialize_pem())?;
            std::fs::write(&crt_path, cert.pem())
                .with_context(|| format!("writing {}", crt_path.display()))?;
            (cert.pem(), key)
        }
    };
    let issuer = Issuer::new(ca_params(), ca_key);

    let mut params = CertificateParams::new(vec![
        "127.0.0.1".to_owned(),
        "::1".to_owned(),
        "localhost".to_owned(),
    ])
    .context("server certificate names")?;
    params
        .distinguished_name
        .push(DnType::CommonName, "acs-emulator");
    params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    // Strict verifiers (OpenSSL 3 with X509_STRICT, as Python 3.13 sets) want the AKI.
    params.use_authority_key_identifier_extension = true;
    let server_key = KeyPair::generate().context("generating the server key")?;
    let server_cert = params
        .signed_by(&server_key, &issuer)
        .context("signing the server certificate")?;

    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .context("TLS protocol versions")?
        .with_no_client_auth()
        .with_single_cert(
            vec![CertificateDer::from(server_cert.der().to_vec())],
            PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der())),
        )
        .context("TLS server configuration")?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Tls {
        ca_pem,
        config: Arc::new(config),
    })
}

fn write_private(path: &Path, contents: &str) -> anyhow::Result<()> {
    use std::io::Write as _;
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    options
        .open(path)
        .and_then(|mut f| f.write_all(contents.as_bytes()))
        .with_context(|| format!("writing {}", path.display()))
}

#[cfg(all(test, unix))]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
    }

    #[test]
    fn fresh_directories_are_private_distinct_and_removed_when_dropped() {
        let a = PrivateTempDir::create().unwrap();
        let b = PrivateTempDir::create().unwrap();
        assert_ne!(a.path(), b.path());
        assert_eq!(mode(a.path()), 0o700);
        prepare(a.path()).unwrap();
        assert_eq!(mode(&a.path().join("ca.key")), 0o600);
        let path = a.path().to_owned();
        drop(a);
        assert!(!path.exists());
    }

    #[test]
    fn an_explicit_directory_is_created_private_and_its_ca_reused() {
        let parent = PrivateTempDir::create().unwrap();
        let dir = parent.path().join("nested/tls");
        let first = prepare(&dir).unwrap();
        assert_eq!(mode(&dir), 0o700);
        assert_eq!(mode(&dir.join("ca.key")), 0o600);
        assert_eq!(prepare(&dir).unwrap().ca_pem, first.ca_pem);
    }

    #[test]
    fn a_directory_others_can_write_is_refused() {
        let dir = PrivateTempDir::create().unwrap();
        for shared in [0o770, 0o1777] {
            std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(shared)).unwrap();
            let err = format!("{:#}", prepare(dir.path()).err().unwrap());
            assert!(err.contains("writable by group or others"), "{err}");
            assert!(err.contains("--tls-dir"), "{err}");
        }
        assert!(!dir.path().join("ca.key").exists());
    }

    #[test]
    fn a_ca_key_others_can_read_is_refused() {
        let dir = PrivateTempDir::create().unwrap();
        prepare(dir.path()).unwrap();
        let key = dir.path().join("ca.key");
        let planted = std::fs::read(&key).unwrap();
        std::fs::set_permissions(&key, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = format!("{:#}", prepare(dir.path()).err().unwrap());
        assert!(
            err.contains("ca.key is readable or writable by group or others"),
            "{err}"
        );
        // Refused, not replaced.
        assert_eq!(std::fs::read(&key).unwrap(), planted);
    }
}
