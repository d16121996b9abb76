//! Node identity and trust: a self-signed certificate per node, and TLS verifiers that accept exactly the
//! certificates whose SHA-256 fingerprints are pinned (no CA, no names). The handshake signatures are still
//! verified against the pinned certificate's key, so holding a copy of a certificate is not enough: the peer
//! must hold its private key.

use std::collections::HashSet;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::{CryptoProvider, WebPkiSupportedAlgorithms};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{CertificateError, DigitallySignedStruct, DistinguishedName, OtherError, SignatureScheme};
use sha2::{Digest, Sha256};

use super::ALPN;
use crate::error::{Error, Result};

/// File names inside an identity directory.
pub const CERT_FILE: &str = "node.crt";
pub const KEY_FILE: &str = "node.key";

/// A node's certificate and private key.
pub struct Identity {
    pub cert: CertificateDer<'static>,
    pub key: PrivateKeyDer<'static>,
    /// Lowercase hex SHA-256 of the DER certificate.
    pub fingerprint: String,
}

impl Clone for Identity {
    fn clone(&self) -> Self {
        Identity { cert: self.cert.clone(), key: self.key.clone_key(), fingerprint: self.fingerprint.clone() }
    }
}

/// Lowercase hex SHA-256 of a DER certificate.
pub fn fingerprint(der: &[u8]) -> String {
    let digest = Sha256::digest(der);
    let mut s = String::with_capacity(64);
    for b in digest {
        let _ = write!(s, "{b:02x}");
    }
    s
}

/// Accepts `AB:CD:...`, `sha256:abcd...` or plain hex; returns 64 lowercase hex digits.
pub fn normalize_fingerprint(s: &str) -> Result<String> {
    let t = s.trim();
    let t = t.strip_prefix("sha256:").unwrap_or(t);
    let hex: String = t.chars().filter(|c| *c != ':').collect::<String>().to_ascii_lowercase();
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::Input(format!(
            "{s:?} is not a SHA-256 certificate fingerprint (64 hex digits, as printed by `aiflow keygen`)"
        )));
    }
    Ok(hex)
}

impl Identity {
    /// A fresh ECDSA P-256 key and a self-signed certificate for it (valid for a long time: trust is by
    /// fingerprint, not by date).
    pub fn generate() -> Result<Identity> {
        let ck = rcgen::generate_simple_self_signed(vec!["aiflow".to_string(), "localhost".to_string()])
            .map_err(|e| Error::Transport(format!("cannot generate a certificate: {e}")))?;
        let cert = ck.cert.der().clone();
        let key = PrivateKeyDer::try_from(ck.key_pair.serialize_der())
            .map_err(|e| Error::Transport(format!("cannot encode the generated key: {e}")))?;
        let fingerprint = fingerprint(&cert);
        Ok(Identity { cert, key, fingerprint })
    }

    /// Writes `node.crt` and `node.key` (PEM; the key readable by the owner only) into `dir`, creating it.
    /// Refuses to overwrite an existing identity.
    pub fn save(&self, dir: &Path) -> Result<(PathBuf, PathBuf)> {
        std::fs::create_dir_all(dir).map_err(|e| Error::Input(format!("cannot create {}: {e}", dir.display())))?;
        let (cp, kp) = (dir.join(CERT_FILE), dir.join(KEY_FILE));
        for p in [&cp, &kp] {
            if p.exists() {
                return Err(Error::Input(format!("{} exists; refusing to overwrite a node identity", p.display())));
            }
        }
        let cert_pem = pem_block("CERTIFICATE", &self.cert);
        let key_pem = pem_block("PRIVATE KEY", self.key.secret_der());
        std::fs::write(&cp, cert_pem).map_err(|e| Error::Input(format!("cannot write {}: {e}", cp.display())))?;
        write_private(&kp, key_pem.as_bytes())?;
        Ok((cp, kp))
    }

    /// Loads a certificate and key (PEM) from files.
    pub fn load(cert_path: &Path, key_path: &Path) -> Result<Identity> {
        let cert = CertificateDer::from_pem_file(cert_path)
            .map_err(|e| Error::Input(format!("cannot read a PEM certificate from {}: {e}", cert_path.display())))?;
        let key = PrivateKeyDer::from_pem_file(key_path)
            .map_err(|e| Error::Input(format!("cannot read a PEM private key from {}: {e}", key_path.display())))?;
        let fingerprint = fingerprint(&cert);
        Ok(Identity { cert, key, fingerprint })
    }

    /// Loads `node.crt` and `node.key` from an identity directory.
    pub fn load_dir(dir: &Path) -> Result<Identity> {
        Identity::load(&dir.join(CERT_FILE), &dir.join(KEY_FILE))
    }
}

fn pem_block(label: &str, der: &[u8]) -> String {
    pem::encode(&pem::Pem::new(label, der.to_vec()))
}

#[cfg(unix)]
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))?;
    f.write_all(data).map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}

#[cfg(not(unix))]
fn write_private(path: &Path, data: &[u8]) -> Result<()> {
    std::fs::write(path, data).map_err(|e| Error::Input(format!("cannot write {}: {e}", path.display())))
}

/// Which peers to accept.
#[derive(Debug, Clone)]
pub enum Trust {
    /// Exactly the certificates with these fingerprints (normalized hex).
    Pinned(HashSet<String>),
    /// Any certificate whose handshake signature checks out. For local experiments only: anyone can connect.
    InsecureDevAcceptAny,
}

impl Trust {
    /// Pins the given fingerprints; an empty list is an error (it would refuse everyone, which is never meant).
    pub fn pinned<I: IntoIterator<Item = S>, S: AsRef<str>>(fps: I) -> Result<Trust> {
        let set = fps.into_iter().map(|s| normalize_fingerprint(s.as_ref())).collect::<Result<HashSet<_>>>()?;
        if set.is_empty() {
            return Err(Error::Input(
                "no trusted peer fingerprints given: pass the peers' fingerprints (from `aiflow keygen`), or the explicit insecure-dev option for local experiments".into(),
            ));
        }
        Ok(Trust::Pinned(set))
    }

    fn check(&self, end_entity: &CertificateDer<'_>, role: &str) -> std::result::Result<(), rustls::Error> {
        match self {
            Trust::InsecureDevAcceptAny => Ok(()),
            Trust::Pinned(set) => {
                let fp = fingerprint(end_entity);
                if set.contains(&fp) {
                    Ok(())
                } else {
                    Err(rustls::Error::InvalidCertificate(CertificateError::Other(OtherError(Arc::new(Untrusted(
                        format!("{role} certificate sha256:{fp} is not in the trusted fingerprints"),
                    ))))))
                }
            }
        }
    }
}

#[derive(Debug)]
struct Untrusted(String);
impl std::fmt::Display for Untrusted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}
impl std::error::Error for Untrusted {}

/// The verifier for both sides: the end-entity certificate must be pinned; the handshake signature is checked
/// with the provider's algorithms against that certificate's key.
#[derive(Debug)]
struct PinnedVerifier {
    trust: Trust,
    algs: WebPkiSupportedAlgorithms,
}

impl PinnedVerifier {
    fn new(trust: Trust, provider: &CryptoProvider) -> Arc<PinnedVerifier> {
        Arc::new(PinnedVerifier { trust, algs: provider.signature_verification_algorithms })
    }
}

/// The handshake-signature methods, the same in both verifier traits: TLS 1.2 is refused (QUIC is TLS 1.3 only)
/// and TLS 1.3 signatures are checked against the key of the certificate that passed the pin check.
macro_rules! handshake_signature_checks {
    () => {
        fn verify_tls12_signature(
            &self,
            _message: &[u8],
            _cert: &CertificateDer<'_>,
            _dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            Err(rustls::Error::PeerIncompatible(rustls::PeerIncompatible::Tls12NotOffered))
        }

        fn verify_tls13_signature(
            &self,
            message: &[u8],
            cert: &CertificateDer<'_>,
            dss: &DigitallySignedStruct,
        ) -> std::result::Result<HandshakeSignatureValid, rustls::Error> {
            rustls::crypto::verify_tls13_signature(message, cert, dss, &self.algs)
        }

        fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
            self.algs.supported_schemes()
        }
    };
}

impl ServerCertVerifier for PinnedVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> std::result::Result<ServerCertVerified, rustls::Error> {
        self.trust.check(end_entity, "server").map(|_| ServerCertVerified::assertion())
    }

    handshake_signature_checks!();
}

impl ClientCertVerifier for PinnedVerifier {
    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        &[]
    }

    fn client_auth_mandatory(&self) -> bool {
        true
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _now: UnixTime,
    ) -> std::result::Result<ClientCertVerified, rustls::Error> {
        self.trust.check(end_entity, "client").map(|_| ClientCertVerified::assertion())
    }

    handshake_signature_checks!();
}

fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_err(e: rustls::Error) -> Error {
    Error::Input(format!("TLS configuration: {e}"))
}

/// The rustls server config: TLS 1.3, ALPN `aiflow/1`, client certificates required and pinned.
pub fn server_tls(id: &Identity, trust: Trust) -> Result<rustls::ServerConfig> {
    let p = provider();
    let mut cfg = rustls::ServerConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .with_client_cert_verifier(PinnedVerifier::new(trust, &p))
        .with_single_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    cfg.max_early_data_size = 0;
    Ok(cfg)
}

/// The rustls client config: TLS 1.3, ALPN `aiflow/1`, our certificate offered, the server's pinned.
pub fn client_tls(id: &Identity, trust: Trust) -> Result<rustls::ClientConfig> {
    let p = provider();
    let mut cfg = rustls::ClientConfig::builder_with_provider(p.clone())
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(tls_err)?
        .dangerous()
        .with_custom_certificate_verifier(PinnedVerifier::new(trust, &p))
        .with_client_auth_cert(vec![id.cert.clone()], id.key.clone_key())
        .map_err(tls_err)?;
    cfg.alpn_protocols = vec![ALPN.to_vec()];
    Ok(cfg)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generate_save_load() {
        let dir = std::env::temp_dir().join(format!("aiflow-id-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let id = Identity::generate().unwrap();
        id.save(&dir).unwrap();
        assert!(id.save(&dir).is_err(), "must not overwrite");
        let back = Identity::load_dir(&dir).unwrap();
        assert_eq!(back.fingerprint, id.fingerprint);
        assert_eq!(back.cert, id.cert);
        assert_eq!(back.key.secret_der(), id.key.secret_der());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn fingerprints() {
        let id = Identity::generate().unwrap();
        assert_eq!(id.fingerprint.len(), 64);
        let colons: String = id.fingerprint.to_uppercase().as_bytes().chunks(2).map(|c| std::str::from_utf8(c).unwrap()).collect::<Vec<_>>().join(":");
        assert_eq!(normalize_fingerprint(&colons).unwrap(), id.fingerprint);
        assert!(normalize_fingerprint("abc").is_err());
        assert!(Trust::pinned(Vec::<String>::new()).is_err());
        let t = Trust::pinned([&id.fingerprint]).unwrap();
        assert!(t.check(&id.cert, "x").is_ok());
        assert!(t.check(&Identity::generate().unwrap().cert, "x").is_err());
    }
}
