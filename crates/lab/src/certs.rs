//! The cluster's certificates (also the test control plane's, `cloak-testkit`): a CA, the API server's serving certificate (valid for every
//! address it is reached at: the lab's proxy on 127.0.0.1, 10.250.0.2 on the lan, the
//! `kubernetes` Service), an admin client certificate (group `system:masters`, used by the
//! admin, the kubelets, kube-proxy, the scheduler and the controller manager: this is a lab, and
//! one identity keeps it small) and the service-account signing key. All ECDSA P-256, mode 0600.

use std::{fs, os::unix::fs::PermissionsExt, path::Path};

use base64::Engine as _;
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};

use crate::{
    error::{Error, Result},
    layout,
};

/// PEM text the kubeconfigs need.
pub struct Certs {
    pub ca: String,
    pub admin_cert: String,
    pub admin_key: String,
}

impl std::fmt::Debug for Certs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Certs(<redacted>)")
    }
}

/// Generates fresh certificates into `dir` (`ca.crt`, `apiserver.{crt,key}`, `sa.{key,pub}`);
/// the admin's go into the kubeconfigs only.
pub fn generate(dir: &Path) -> Result<Certs> {
    let ca_key = KeyPair::generate()?;
    let mut ca_params = CertificateParams::default();
    ca_params
        .distinguished_name
        .push(DnType::CommonName, "cloak-lab-ca");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    ca_params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let ca_cert = ca_params.self_signed(&ca_key)?;
    let ca = Issuer::new(ca_params, ca_key);

    let serving_key = KeyPair::generate()?;
    let mut serving = CertificateParams::new(vec![
        "localhost".to_owned(),
        "kubernetes".to_owned(),
        "kubernetes.default".to_owned(),
        "kubernetes.default.svc".to_owned(),
        "kubernetes.default.svc.cluster.local".to_owned(),
    ])?;
    for ip in ["127.0.0.1", layout::API_SERVER, layout::KUBERNETES_SERVICE] {
        let ip: std::net::IpAddr = ip.parse().map_err(|e| Error::Other(format!("{ip}: {e}")))?;
        serving.subject_alt_names.push(SanType::IpAddress(ip));
    }
    serving
        .distinguished_name
        .push(DnType::CommonName, "kube-apiserver");
    serving.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
    let serving_cert = serving.signed_by(&serving_key, &ca)?;

    let admin_key = KeyPair::generate()?;
    let mut admin = CertificateParams::default();
    admin
        .distinguished_name
        .push(DnType::CommonName, "cloak-lab-admin");
    admin
        .distinguished_name
        .push(DnType::OrganizationName, "system:masters");
    admin.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let admin_cert = admin.signed_by(&admin_key, &ca)?;

    let sa_key = KeyPair::generate()?;
    let certs = Certs {
        ca: ca_cert.pem(),
        admin_cert: admin_cert.pem(),
        admin_key: admin_key.serialize_pem(),
    };
    let files = [
        ("ca.crt", certs.ca.clone()),
        ("apiserver.crt", serving_cert.pem()),
        ("apiserver.key", serving_key.serialize_pem()),
        ("sa.key", sa_key.serialize_pem()),
        ("sa.pub", sa_key.public_key_pem()),
    ];
    for (name, pem) in files {
        write_private(&dir.join(name), &pem)?;
    }
    Ok(certs)
}

/// A kubeconfig for `server` with the admin identity.
pub fn kubeconfig(server: &str, certs: &Certs) -> String {
    let b64 = |pem: &str| base64::engine::general_purpose::STANDARD.encode(pem);
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: cloak-lab\n  cluster:\n    server: {server}\n    certificate-authority-data: {}\nusers:\n- name: admin\n  user:\n    client-certificate-data: {}\n    client-key-data: {}\ncontexts:\n- name: cloak-lab\n  context:\n    cluster: cloak-lab\n    user: admin\n    namespace: default\ncurrent-context: cloak-lab\n",
        b64(&certs.ca),
        b64(&certs.admin_cert),
        b64(&certs.admin_key),
    )
}

/// Writes `text` to `path` with mode 0600.
pub fn write_private(path: &Path, text: &str) -> Result<()> {
    fs::write(path, text).map_err(Error::io(path))?;
    fs::set_permissions(path, fs::Permissions::from_mode(0o600)).map_err(Error::io(path))
}
