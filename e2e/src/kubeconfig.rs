//! Kubeconfig files for the local clusters, with credentials embedded so that a file can
//! also be stored in a Secret as an EdgePool member's credentials.

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// A kubeconfig YAML for `server`, trusting `ca_pem` and authenticating with a client
/// certificate or a bearer token.
pub fn render(cluster: &str, server: &str, ca_pem: &str, user: &User) -> String {
    let ca = STANDARD.encode(ca_pem);
    let credentials = match user {
        User::ClientCertificate { cert_pem, key_pem } => format!(
            "    client-certificate-data: {}\n    client-key-data: {}\n",
            STANDARD.encode(cert_pem),
            STANDARD.encode(key_pem)
        ),
        User::Token(token) => format!("    token: {token}\n"),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: {cluster}\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {cluster}-user\n  user:\n{credentials}contexts:\n- name: {cluster}\n  context:\n    cluster: {cluster}\n    user: {cluster}-user\ncurrent-context: {cluster}\n"
    )
}

/// How a kubeconfig authenticates.
#[derive(Debug, Clone)]
pub enum User {
    /// An X.509 client certificate and key (PEM).
    ClientCertificate {
        /// Certificate PEM.
        cert_pem: String,
        /// Key PEM.
        key_pem: String,
    },
    /// A bearer token (e.g. a service-account token).
    Token(String),
}
