//! Broker addresses: `mqtt://HOST[:PORT]` and `mqtts://HOST[:PORT]`.

use super::ConfigError;

/// A parsed `--broker` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerAddress {
    pub host: String,
    pub port: u16,
    /// `mqtts://`: TLS, the broker's certificate checked against `broker_ca`.
    pub tls: bool,
}

impl BrokerAddress {
    /// A plain-MQTT address.
    pub fn plain(host: impl Into<String>, port: u16) -> BrokerAddress {
        BrokerAddress {
            host: host.into(),
            port,
            tls: false,
        }
    }

    /// `mqtt://HOST[:PORT]` (default port 1883) or `mqtts://HOST[:PORT]` (8883).
    pub fn parse(url: &str) -> Result<BrokerAddress, ConfigError> {
        let bad = |why: &str| ConfigError::Invalid(format!("broker `{url}`: {why}"));
        let (rest, tls, default_port) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (rest, false, 1883)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (rest, true, 8883)
        } else {
            return Err(bad("expected mqtt://HOST[:PORT] or mqtts://HOST[:PORT]"));
        };
        let rest = rest.trim_end_matches('/');
        let port = |p: &str| {
            p.parse::<u16>()
                .map_err(|_| bad("port must be a number 1-65535"))
        };
        let (host, port) = if let Some(r) = rest.strip_prefix('[') {
            let (h, after) = r.split_once(']').ok_or_else(|| bad("unclosed ["))?;
            match after.strip_prefix(':') {
                Some(p) => (h, port(p)?),
                None if after.is_empty() => (h, default_port),
                None => return Err(bad("expected mqtt://[IPV6]:PORT")),
            }
        } else {
            match rest.rsplit_once(':') {
                Some((h, p)) => (h, port(p)?),
                None => (rest, default_port),
            }
        };
        if host.is_empty() || port == 0 {
            return Err(bad("expected mqtt://HOST[:PORT]"));
        }
        Ok(BrokerAddress {
            host: host.to_owned(),
            port,
            tls,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn broker_urls() {
        let a = BrokerAddress::parse("mqtt://127.0.0.1:1884").unwrap();
        assert_eq!((a.host.as_str(), a.port), ("127.0.0.1", 1884));
        assert_eq!(BrokerAddress::parse("mqtt://broker").unwrap().port, 1883);
        assert_eq!(BrokerAddress::parse("mqtt://[::1]:99").unwrap().host, "::1");
        assert!(BrokerAddress::parse("tcp://x").is_err());
        assert!(BrokerAddress::parse("mqtt://x:notaport").is_err());
        assert!(BrokerAddress::parse("mqtt://").is_err());
        assert!(!BrokerAddress::parse("mqtt://x").unwrap().tls);
        let a = BrokerAddress::parse("mqtts://broker.example.com").unwrap();
        assert_eq!(
            (a.host.as_str(), a.port, a.tls),
            ("broker.example.com", 8883, true)
        );
        assert_eq!(BrokerAddress::parse("mqtts://[::1]:9").unwrap().port, 9);
    }
}
