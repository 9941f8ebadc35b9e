//! Which address the seeder tells the world about: the public URL put into .torrent files and
//! magnets, and the peer address it lists for itself in its own tracker.

use std::net::{IpAddr, SocketAddr};

/// This host's first non-loopback address (IPv4 preferred), if it has one.
pub fn first_non_loopback() -> Option<IpAddr> {
    let mut addrs: Vec<IpAddr> = if_addrs::get_if_addrs()
        .ok()?
        .into_iter()
        .map(|i| i.ip())
        .filter(|ip| !ip.is_loopback() && !ip.is_unspecified())
        .filter(|ip| !matches!(ip, IpAddr::V6(v6) if (v6.segments()[0] & 0xffc0) == 0xfe80))
        .collect();
    addrs.sort_by_key(|ip| ip.is_ipv6());
    addrs.into_iter().next()
}

/// The host an unspecified listen address stands for.
pub fn advertised_host(listen: IpAddr) -> IpAddr {
    if !listen.is_unspecified() {
        return listen;
    }
    first_non_loopback().unwrap_or_else(|| {
        tracing::warn!("no non-loopback address on this host: advertising 127.0.0.1");
        IpAddr::from([127, 0, 0, 1])
    })
}

/// `http://host:port` (IPv6 in brackets).
pub fn http_url(ip: IpAddr, port: u16) -> String {
    format!("http://{}", SocketAddr::new(ip, port))
}

/// The host a URL names (an IP address, without brackets, or a DNS name).
pub fn url_host(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    protocol::host_of(authority).to_owned()
}

/// The IP the public URL names: its literal address, or its host name resolved.
pub async fn public_url_ip(url: &str) -> Option<IpAddr> {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next()?;
    if let Ok(sa) = authority.parse::<SocketAddr>() {
        return Some(sa.ip());
    }
    let host = protocol::host_of(authority);
    if let Ok(ip) = host.parse() {
        return Some(ip);
    }
    tokio::net::lookup_host((host, 0))
        .await
        .ok()?
        .next()
        .map(|a| a.ip())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn public_url_hosts() {
        assert_eq!(
            public_url_ip("http://198.18.0.1:8080/x").await,
            Some("198.18.0.1".parse().unwrap())
        );
        assert_eq!(
            public_url_ip("http://[::1]:80").await,
            Some("::1".parse().unwrap())
        );
        assert_eq!(
            public_url_ip("http://127.0.0.2").await,
            Some("127.0.0.2".parse().unwrap())
        );
        assert_eq!(http_url("::1".parse().unwrap(), 5), "http://[::1]:5");
    }
}
