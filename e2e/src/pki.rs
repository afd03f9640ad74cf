//! Certificates and keys of one local control plane: a CA, the API servers' serving
//! certificate, an admin client certificate and the service-account signing key.

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use std::path::{Path, PathBuf};

/// Errors while creating or writing credentials.
#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    /// rcgen failed to generate or sign.
    #[error("generating certificates: {0}")]
    Rcgen(#[from] rcgen::Error),
    /// Writing a file failed.
    #[error("writing {path}: {source}")]
    Write {
        /// The file.
        path: PathBuf,
        /// The error.
        source: std::io::Error,
    },
}

/// PEM files of a control plane, shared by its clusters (each cluster gets its own
/// service-account key pair and issuer).
#[derive(Clone, Debug)]
pub struct Pki {
    /// CA certificate (PEM file).
    pub ca_cert: PathBuf,
    /// Serving certificate for 127.0.0.1 and localhost.
    pub serving_cert: PathBuf,
    /// Key of the serving certificate.
    pub serving_key: PathBuf,
    /// Admin client certificate (O=system:masters).
    pub admin_cert: PathBuf,
    /// Admin client key.
    pub admin_key: PathBuf,
    /// PEM text of the CA certificate.
    pub ca_pem: String,
    /// PEM text of the admin certificate.
    pub admin_cert_pem: String,
    /// PEM text of the admin key.
    pub admin_key_pem: String,
}

fn write(path: &Path, contents: &str) -> Result<(), PkiError> {
    std::fs::write(path, contents).map_err(|source| PkiError::Write {
        path: path.to_path_buf(),
        source,
    })
}

impl Pki {
    /// Creates a fresh CA and the certificates signed by it under `dir`.
    pub fn create(dir: &Path) -> Result<Pki, PkiError> {
        let mut ca_params = CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "edgeloom-e2e-ca");
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate()?)?;

        let mut serving = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            "kubernetes.default.svc".to_string(),
        ])?;
        serving
            .distinguished_name
            .push(DnType::CommonName, "kube-apiserver");
        serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let serving_key = KeyPair::generate()?;
        let serving_cert = serving.signed_by(&serving_key, &ca)?;

        let mut admin = CertificateParams::new(Vec::<String>::new())?;
        admin
            .distinguished_name
            .push(DnType::CommonName, "edgeloom-admin");
        admin
            .distinguished_name
            .push(DnType::OrganizationName, "system:masters");
        admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let admin_key = KeyPair::generate()?;
        let admin_cert = admin.signed_by(&admin_key, &ca)?;

        let pki = Pki {
            ca_cert: dir.join("ca.crt"),
            serving_cert: dir.join("apiserver.crt"),
            serving_key: dir.join("apiserver.key"),
            admin_cert: dir.join("admin.crt"),
            admin_key: dir.join("admin.key"),
            ca_pem: ca.pem(),
            admin_cert_pem: admin_cert.pem(),
            admin_key_pem: admin_key.serialize_pem(),
        };
        write(&pki.ca_cert, &pki.ca_pem)?;
        write(&pki.serving_cert, &serving_cert.pem())?;
        write(&pki.serving_key, &serving_key.serialize_pem())?;
        write(&pki.admin_cert, &pki.admin_cert_pem)?;
        write(&pki.admin_key, &pki.admin_key_pem)?;
        Ok(pki)
    }

    /// Writes a new service-account signing key pair (ECDSA P-256) under `dir`, returning
    /// (private key file, public key file).
    pub fn service_account_keys(dir: &Path) -> Result<(PathBuf, PathBuf), PkiError> {
        let key = KeyPair::generate()?;
        let private = dir.join("sa.key");
        let public = dir.join("sa.pub");
        write(&private, &key.serialize_pem())?;
        write(&public, &key.public_key_pem())?;
        Ok((private, public))
    }
}
