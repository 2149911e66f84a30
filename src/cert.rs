//! X.509 certificates as authd sees them: the SHA-256 fingerprint of a PEM certificate's DER
//! encoding (what `Entity.Put` pins and `Authenticate` compares) and its validity period.
//! Parsing uses the maintained `x509-parser` crate; nothing here trusts or builds chains —
//! pinning replaces that.

use std::fmt::Write;

use x509_parser::pem::parse_x509_pem;
use x509_parser::prelude::FromDer;

use crate::crypto::sha256;

/// A parsed certificate: only what authd decides on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Certificate {
    /// SHA-256 of the DER encoding.
    pub sha256: [u8; 32],
    /// Validity period, UNIX seconds, both ends inclusive.
    pub not_before: i64,
    pub not_after: i64,
}

/// Why a presented certificate is not one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum CertError {
    #[error("not a PEM block")]
    NotPem,
    #[error("the first PEM block is not a CERTIFICATE")]
    NotCertificate,
    #[error("not a valid X.509 certificate")]
    Invalid,
}

impl Certificate {
    /// Parses the first PEM block of `pem`, which must be a `CERTIFICATE` (a chain may
    /// follow; its leaf comes first and is the one that counts).
    pub fn from_pem(pem: &str) -> Result<Certificate, CertError> {
        let (_, block) = parse_x509_pem(pem.as_bytes()).map_err(|_| CertError::NotPem)?;
        if block.label != "CERTIFICATE" {
            return Err(CertError::NotCertificate);
        }
        Self::from_der(&block.contents)
    }

    /// Parses a DER certificate; trailing bytes are refused (they would change the
    /// fingerprint without changing the certificate).
    pub fn from_der(der: &[u8]) -> Result<Certificate, CertError> {
        let (rest, cert) = x509_parser::certificate::X509Certificate::from_der(der)
            .map_err(|_| CertError::Invalid)?;
        if !rest.is_empty() {
            return Err(CertError::Invalid);
        }
        let validity = cert.validity();
        Ok(Certificate {
            sha256: sha256(der),
            not_before: validity.not_before.timestamp(),
            not_after: validity.not_after.timestamp(),
        })
    }

    /// Whether `unix_secs` is inside the validity period.
    pub fn valid_at(&self, unix_secs: i64) -> bool {
        self.not_before <= unix_secs && unix_secs <= self.not_after
    }
}

/// Parses a SHA-256 fingerprint written as 64 hex digits, optionally in colon-separated
/// pairs as `openssl x509 -fingerprint -sha256` prints it. Either case.
pub fn parse_fingerprint(text: &str) -> Option<[u8; 32]> {
    let digits: Vec<u8> = if text.contains(':') {
        let pairs: Vec<&str> = text.split(':').collect();
        if pairs.len() != 32 || pairs.iter().any(|p| p.len() != 2) {
            return None;
        }
        pairs.concat().into_bytes()
    } else {
        text.as_bytes().to_vec()
    };
    if digits.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (byte, pair) in out.iter_mut().zip(digits.chunks_exact(2)) {
        let hi = (pair[0] as char).to_digit(16)?;
        let lo = (pair[1] as char).to_digit(16)?;
        *byte = (hi * 16 + lo) as u8;
    }
    Some(out)
}

/// Lower-case hex, the form `Entity.Get` reports a fingerprint in.
pub fn hex(bytes: &[u8]) -> String {
    let mut s = String::with_capacity(bytes.len() * 2);
    for b in bytes {
        let _ = write!(s, "{b:02x}");
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_parse_in_both_forms() {
        let plain = "00ff".repeat(16);
        let fp = parse_fingerprint(&plain).unwrap();
        assert_eq!(fp[..2], [0x00, 0xff]);
        assert_eq!(hex(&fp), plain);
        let colons = ["00", "FF"].repeat(16).join(":");
        assert_eq!(parse_fingerprint(&colons), Some(fp));
        for bad in [
            "",
            "00",
            &"0g".repeat(32),
            &"0".repeat(63),
            &"00".repeat(33),
        ] {
            assert_eq!(parse_fingerprint(bad), None, "{bad}");
        }
        // A multi-byte character must not be split into "hex digits".
        assert_eq!(parse_fingerprint(&format!("é{}", "0".repeat(62))), None);
    }

    #[test]
    fn garbage_is_not_a_certificate() {
        assert_eq!(Certificate::from_pem("hello"), Err(CertError::NotPem));
        assert_eq!(
            Certificate::from_pem("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n"),
            Err(CertError::NotCertificate)
        );
        assert_eq!(
            Certificate::from_pem("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            Err(CertError::Invalid)
        );
    }
}
