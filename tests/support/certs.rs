//! Certificates made in the test: a fresh key pair per call, self-signed with rcgen.

use rcgen::{date_time_ymd, CertificateParams, KeyPair};

/// A PEM certificate for `name`, valid from 1975 to 4096.
pub fn valid(name: &str) -> String {
    make(name, None)
}

/// A PEM certificate for `name` that expired at the start of 2001.
pub fn expired(name: &str) -> String {
    make(name, Some(((2000, 1, 1), (2001, 1, 1))))
}

/// A PEM certificate for `name` that becomes valid in 4000.
pub fn not_yet_valid(name: &str) -> String {
    make(name, Some(((4000, 1, 1), (4001, 1, 1))))
}

/// (year, month, day).
type Day = (i32, u8, u8);

fn make(name: &str, period: Option<(Day, Day)>) -> String {
    let mut params = CertificateParams::new(vec![name.to_owned()]).expect("cert params");
    if let Some(((y0, m0, d0), (y1, m1, d1))) = period {
        params.not_before = date_time_ymd(y0, m0, d0);
        params.not_after = date_time_ymd(y1, m1, d1);
    }
    let key = KeyPair::generate().expect("key pair");
    params.self_signed(&key).expect("self-signed cert").pem()
}

/// Lower-case hex SHA-256 of the certificate's DER, computed independently of authd.
pub fn sha256_hex(pem: &str) -> String {
    use sha2::{Digest, Sha256};
    let der = pem_to_der(pem);
    Sha256::digest(der)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

fn pem_to_der(pem: &str) -> Vec<u8> {
    use base64::Engine;
    let body: String = pem.lines().filter(|l| !l.starts_with("-----")).collect();
    base64::engine::general_purpose::STANDARD
        .decode(body)
        .expect("PEM body is base64")
}

/// A certificate authority made in the test, for TLS between authd and mosquitto.
pub struct Ca {
    issuer: rcgen::CertifiedIssuer<'static, KeyPair>,
}

impl Ca {
    pub fn new(name: &str) -> Ca {
        use rcgen::{BasicConstraints, DnType, IsCa, KeyUsagePurpose};
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let key = KeyPair::generate().expect("CA key");
        Ca {
            issuer: rcgen::CertifiedIssuer::self_signed(params, key).expect("CA cert"),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.pem()
    }

    /// A server certificate for `names` (DNS names or IP addresses): `(cert PEM, key PEM)`.
    pub fn server(&self, names: &[&str]) -> (String, String) {
        self.issue(names, rcgen::ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate with common name `name`: `(cert PEM, key PEM)`.
    pub fn client(&self, name: &str) -> (String, String) {
        self.issue(&[name], rcgen::ExtendedKeyUsagePurpose::ClientAuth)
    }

    fn issue(&self, names: &[&str], usage: rcgen::ExtendedKeyUsagePurpose) -> (String, String) {
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let mut params = CertificateParams::new(names.clone()).expect("cert params");
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, names[0].as_str());
        params.extended_key_usages = vec![usage];
        let key = KeyPair::generate().expect("key pair");
        let cert = params.signed_by(&key, &self.issuer).expect("signed cert");
        (cert.pem(), key.serialize_pem())
    }
}
