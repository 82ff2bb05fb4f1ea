//! The emulator's own certificate authority and its server certificate.
//!
//! The CA's key and certificate are kept in the TLS directory and reused on the next start,
//! so a client that trusts `ca.crt` keeps trusting a restarted emulator. The server
//! certificate (127.0.0.1, ::1, localhost) is minted fresh at every start.

use std::path::Path;
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

/// Loads or creates the CA in `dir` (writing `ca.crt` and `ca.key`), then mints a server
/// certificate signed by it.
pub fn prepare(dir: &Path) -> anyhow::Result<Tls> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let crt_path = dir.join("ca.crt");
    let key_path = dir.join("ca.key");
    let existing = match (
        std::fs::read_to_string(&crt_path),
        std::fs::read_to_string(&key_path),
    ) {
        (Ok(crt), Ok(key)) => KeyPair::from_pem(&key).ok().map(|key| (crt, key)),
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
