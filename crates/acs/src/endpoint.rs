//! Which hosts a connection string's endpoint may name. Tenants write their own connection
//! strings: without a list, the client would sign requests for, and read answers from, any
//! server a tenant names, the cluster's own services included.

use std::net::IpAddr;

use crate::error::{MAX_ENDPOINT_BYTES, bounded_echo};

/// Azure's ACS data-plane domains, one per cloud that offers ACS.
///
/// - `communication.azure.com`, the public cloud: the domain of the connection strings the
///   Azure portal hands out (`https://<resource>.communication.azure.com/`), as in the ACS
///   identity API notes and Microsoft's SDK samples.
/// - `communication.azure.us`, Azure Government: the Dynamics 365 Customer Service docs list
///   `https://*.communication.azure.us` among the Government Community Cloud hosts to allow, and
///   Microsoft's MCP server (repository `microsoft/mcp`, file
///   `core/Microsoft.Mcp.Core/src/Helpers/EndpointValidator.AllowLists.cs`) allows
///   `.communication.azure.us` for ACS in the US Government cloud.
/// - `communication.azure.cn`, Azure operated by 21Vianet: the same allow-list's ACS entry for
///   the China cloud.
///
/// That allow-list also names `.communication.azure.de` for Azure Germany, a cloud that closed
/// in 2021 without ever offering ACS: left out.
const AZURE_SUFFIXES: [&str; 3] = [
    "communication.azure.com",
    "communication.azure.us",
    "communication.azure.cn",
];

/// The hosts an ACS endpoint may have: each listed suffix admits itself and every host under
/// it (on label boundaries); an IP address or `localhost` is admitted only when listed exactly.
/// The default is [`EndpointPolicy::azure_default`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EndpointPolicy {
    /// Lower-case, without leading or trailing dots; IP addresses in canonical form.
    suffixes: Vec<String>,
}

/// What is wrong with an endpoint suffix list.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EndpointListError {
    #[error(
        "entry {position} of the endpoint suffix list is empty; list host suffixes separated by commas, e.g. `communication.azure.com,acs.example.internal`"
    )]
    EmptyEntry { position: usize },
    #[error(
        "`{entry}` in the endpoint suffix list is neither a host name, a domain suffix nor an IP address: give letters, digits, `-` and `.` only (international names in their xn-- form), without scheme, port or path"
    )]
    InvalidEntry { entry: String },
}

impl Default for EndpointPolicy {
    fn default() -> Self {
        Self::azure_default()
    }
}

impl EndpointPolicy {
    /// Azure's public and sovereign ACS domains, and nothing else.
    pub fn azure_default() -> Self {
        Self {
            suffixes: AZURE_SUFFIXES.map(str::to_owned).to_vec(),
        }
    }

    /// A comma-separated list of suffixes (`communication.azure.com, .acs.example.internal,
    /// 127.0.0.1`): trimmed, case-insensitive, a leading dot optional. Empty entries are refused,
    /// so that a stray comma cannot go unnoticed.
    pub fn from_list(list: &str) -> Result<Self, EndpointListError> {
        let suffixes = list
            .split(',')
            .enumerate()
            .map(|(index, entry)| suffix_entry(index + 1, entry))
            .collect::<Result<_, _>>()?;
        Ok(Self { suffixes })
    }

    /// Whether `url_host` (a URL's host, as `Url::host_str` gives it) is admitted.
    pub fn admits(&self, url_host: &str) -> bool {
        let host = normalized(url_host);
        if host.is_empty() {
            return false;
        }
        if is_listed_exactly_only(&host) {
            return self.suffixes.contains(&host);
        }
        self.suffixes.iter().any(|suffix| is_under(&host, suffix))
    }
}

/// Whether `host` is under one of Azure's ACS domains ([`EndpointPolicy::azure_default`]).
pub fn is_azure_host(host: &str) -> bool {
    let host = normalized(host);
    !is_listed_exactly_only(&host) && AZURE_SUFFIXES.iter().any(|suffix| is_under(&host, suffix))
}

fn suffix_entry(position: usize, entry: &str) -> Result<String, EndpointListError> {
    let trimmed = entry.trim();
    let suffix = normalized(trimmed.strip_prefix('.').unwrap_or(trimmed));
    if suffix.is_empty() {
        return Err(EndpointListError::EmptyEntry { position });
    }
    let is_host_name = suffix.split('.').all(|label| {
        !label.is_empty()
            && label
                .bytes()
                .all(|byte| byte.is_ascii_alphanumeric() || byte == b'-')
    });
    if is_host_name || suffix.parse::<IpAddr>().is_ok() {
        Ok(suffix)
    } else {
        Err(EndpointListError::InvalidEntry {
            entry: bounded_echo(trimmed, MAX_ENDPOINT_BYTES),
        })
    }
}

/// Lower-case, without the brackets of an IPv6 literal or a final dot (`x.example.` names the
/// same host as `x.example`); an IP address in canonical form, so `[0::1]` is `::1`.
fn normalized(host: &str) -> String {
    let host = host.trim_end_matches('.');
    let unbracketed = host
        .strip_prefix('[')
        .and_then(|inner| inner.strip_suffix(']'))
        .unwrap_or(host);
    match unbracketed.parse::<IpAddr>() {
        Ok(address) => address.to_string(),
        Err(_) => host.to_ascii_lowercase(),
    }
}

/// An IP address or a loopback name (`localhost`, and `*.localhost`, which resolvers may send
/// to loopback too): a suffix rule would admit far more than meant, so only exact listing does.
fn is_listed_exactly_only(host: &str) -> bool {
    host.parse::<IpAddr>().is_ok() || host == "localhost" || host.ends_with(".localhost")
}

/// `host` is `suffix` or a host under it: `x.communication.azure.com` is under
/// `communication.azure.com`, `evilcommunication.azure.com` is not.
fn is_under(host: &str, suffix: &str) -> bool {
    host == suffix
        || host
            .strip_suffix(suffix)
            .is_some_and(|rest| rest.ends_with('.'))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_admits_azure_acs_domains_on_label_boundaries() {
        let policy = EndpointPolicy::azure_default();
        assert_eq!(policy, EndpointPolicy::default());
        let admitted = [
            "r.communication.azure.com",
            "R.Communication.Azure.COM",
            "r.communication.azure.com.",
            "a.b.communication.azure.us",
            "r.communication.azure.cn",
            "communication.azure.com",
        ];
        for host in admitted {
            assert!(policy.admits(host), "{host}");
            assert!(is_azure_host(host), "{host}");
        }
        let refused = [
            "evilcommunication.azure.com",
            "communication.azure.com.evil.net",
            "r.communication.azure.de",
            "azure.com",
            "example.com",
            "127.0.0.1",
            "[::1]",
            "localhost",
            "",
            ".",
        ];
        for host in refused {
            assert!(!policy.admits(host), "{host}");
            assert!(!is_azure_host(host), "{host}");
        }
    }

    #[test]
    fn a_list_is_trimmed_lower_cased_and_dots_are_optional() {
        let policy =
            EndpointPolicy::from_list(" .ACS.Example.Internal , communication.azure.com ").unwrap();
        assert!(policy.admits("r.acs.example.internal"));
        assert!(policy.admits("acs.example.internal"));
        assert!(policy.admits("r.communication.azure.com"));
        assert!(!policy.admits("r.communication.azure.us"));
        assert!(!policy.admits("evilacs.example.internal"));
    }

    #[test]
    fn ip_addresses_and_localhost_only_as_listed() {
        let policy = EndpointPolicy::from_list("127.0.0.1,localhost,[::1],0.0.1").unwrap();
        for host in ["127.0.0.1", "localhost", "LOCALHOST", "[::1]", "[0:0::1]"] {
            assert!(policy.admits(host), "{host}");
        }
        for host in [
            "127.0.0.2",
            "10.0.0.1",
            "a.localhost",
            "::2",
            "[::ffff:127.0.0.1]",
        ] {
            assert!(!policy.admits(host), "{host}");
        }
        // A name suffix never admits an address or a loopback name.
        let policy = EndpointPolicy::from_list("0.1,localhost").unwrap();
        assert!(!policy.admits("127.0.0.1"));
        assert!(!policy.admits("evil.localhost"));
    }

    #[test]
    fn bad_lists_say_what_is_wrong() {
        let cases = [
            ("", EndpointListError::EmptyEntry { position: 1 }),
            (
                "communication.azure.com,",
                EndpointListError::EmptyEntry { position: 2 },
            ),
            (
                "a.example, ,b.example",
                EndpointListError::EmptyEntry { position: 2 },
            ),
            (".", EndpointListError::EmptyEntry { position: 1 }),
            (
                "https://r.communication.azure.com",
                EndpointListError::InvalidEntry {
                    entry: "https://r.communication.azure.com".into(),
                },
            ),
            (
                "acs.example:443",
                EndpointListError::InvalidEntry {
                    entry: "acs.example:443".into(),
                },
            ),
            (
                "a..example",
                EndpointListError::InvalidEntry {
                    entry: "a..example".into(),
                },
            ),
            (
                "*.example",
                EndpointListError::InvalidEntry {
                    entry: "*.example".into(),
                },
            ),
        ];
        for (list, expected) in cases {
            assert_eq!(EndpointPolicy::from_list(list), Err(expected), "{list:?}");
        }
        let error = EndpointPolicy::from_list("a,,b").unwrap_err();
        assert!(error.to_string().contains("entry 2"), "{error}");
    }
}
