//! A small internet a test builds for itself out of network namespaces: a public network
//! (a bridge, 198.19.0.0/24 from the benchmarking range, routed nowhere else) with public
//! hosts on it, and homes: a router namespace that masquerades (SNAT) its private bridge
//! (10.H.0.0/24) onto the public network and drops unsolicited inbound traffic (nftables), as a
//! home router does. The test process itself stays in the root namespace and reaches the
//! public network at [`Internet::OBSERVER`]. Everything is deleted on drop.
//!
//! A home may sit behind a WAN delay: its router's link to the public network then runs
//! through a namespace of its own where `delay_link` (see [`crate::delay`]) copies frames with
//! a one-way delay that can be changed while the swarm runs.
//!
//! Needs root, `ip` (iproute2) and `nft` (nftables).

use std::path::Path;
use std::process::Command;

use crate::Proc;

/// Run a command that sets the topology up; panics naming it and its stderr on failure.
fn run(program: &str, args: &[&str]) {
    let out = Command::new(program)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("running {program} (is it installed?): {e}"));
    assert!(
        out.status.success(),
        "{program} {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// One namespace with one address.
pub struct Host {
    pub ns: String,
    pub ip: String,
}

impl Host {
    /// Start one of our binaries in this namespace (as [`Proc::start`]: waits for `[READY]`).
    pub fn start(&self, name: &str, program: &Path, args: &[String]) -> Proc {
        let mut all = vec![
            "netns".to_owned(),
            "exec".to_owned(),
            self.ns.clone(),
            program.display().to_string(),
        ];
        all.extend_from_slice(args);
        Proc::start(name, Path::new("ip"), &all)
    }

    /// Run a command in this namespace, panicking on failure.
    pub fn run(&self, program: &str, args: &[&str]) {
        let mut all = vec!["netns", "exec", &self.ns, program];
        all.extend_from_slice(args);
        run("ip", &all);
    }
}

/// A home network: its router (whose public address all its hosts share) and its hosts.
pub struct Home {
    pub index: u8,
    pub router: Host,
    lan_bridge: String,
    wan_link: String,
    hosts: u8,
    /// The forwarder between the router and the public network, for a home behind a delay.
    delay: Option<Proc>,
}

/// The topology; deleted on drop.
pub struct Internet {
    prefix: String,
    bridge: String,
    namespaces: Vec<String>,
    links: usize,
}

impl Internet {
    /// The root namespace's address on the public network, from which the test talks to the
    /// public hosts.
    pub const OBSERVER: &'static str = "198.19.0.254";

    /// An empty public network. Panics (naming what is missing) without root, `ip` or `nft`.
    pub fn new() -> Internet {
        // Unique per topology: a namespace's links are deleted after the namespace, in the
        // background, so the next topology of the same process must not reuse their names.
        static MADE: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let made = MADE.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let prefix = format!("ss{}x{made}", std::process::id() % 100_000);
        let bridge = format!("{prefix}pub");
        run("ip", &["link", "add", &bridge, "type", "bridge"]);
        let net = Internet {
            prefix,
            bridge,
            namespaces: Vec::new(),
            links: 0,
        };
        run(
            "ip",
            &[
                "addr",
                "add",
                &format!("{}/24", Internet::OBSERVER),
                "dev",
                &net.bridge,
            ],
        );
        run("ip", &["link", "set", &net.bridge, "up"]);
        net
    }

    fn namespace(&mut self, name: &str) -> String {
        let ns = format!("{}{name}", self.prefix);
        run("ip", &["netns", "add", &ns]);
        run("ip", &["-n", &ns, "link", "set", "lo", "up"]);
        self.namespaces.push(ns.clone());
        ns
    }

    /// A veth pair: (the end moved into `inner_ns`, the outer end, left in the root namespace).
    fn veth(&mut self, inner_ns: &str) -> (String, String) {
        self.links += 1;
        let (inner, outer) = (
            format!("{}i{}", self.prefix, self.links),
            format!("{}o{}", self.prefix, self.links),
        );
        run(
            "ip",
            &[
                "link", "add", &inner, "type", "veth", "peer", "name", &outer,
            ],
        );
        run("ip", &["link", "set", &inner, "netns", inner_ns]);
        run("ip", &["-n", inner_ns, "link", "set", &inner, "up"]);
        (inner, outer)
    }

    /// A host on the public network at 198.19.0.`octet`.
    pub fn public_host(&mut self, name: &str, octet: u8) -> Host {
        self.public_link(name, octet).0
    }

    /// [`Internet::public_host`], and the name of its link to the public network.
    fn public_link(&mut self, name: &str, octet: u8) -> (Host, String) {
        let ns = self.namespace(name);
        let ip = format!("198.19.0.{octet}");
        let (inner, outer) = self.veth(&ns);
        self.plug_into_bridge(&outer);
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner],
        );
        (Host { ns, ip }, inner)
    }

    /// Attach a root-namespace interface to the public bridge.
    fn plug_into_bridge(&self, interface: &str) {
        run("ip", &["link", "set", interface, "master", &self.bridge]);
        run("ip", &["link", "set", interface, "up"]);
    }

    /// Home `index` (1..=9): a router at 198.19.0.(10 + index) masquerading 10.`index`.0.0/24
    /// and dropping inbound traffic that answers nothing sent from inside.
    pub fn home(&mut self, index: u8) -> Home {
        let (router, wan_link) = self.public_link(&format!("r{index}"), 10 + index);
        self.home_behind(index, router, wan_link)
    }

    /// [`Internet::home`] whose router reaches the public network through a wire with a
    /// one-way delay in each direction ([`Home::set_delay`]; none at first): a namespace
    /// between the two, without addresses, where `delay_link` copies the frames.
    pub fn home_with_delay(&mut self, index: u8) -> Home {
        let router_ns = self.namespace(&format!("r{index}"));
        let ip = format!("198.19.0.{}", 10 + index);
        let wire = self.namespace(&format!("d{index}"));
        // Nothing in the wire's namespace speaks: no addresses, no IPv6 autoconfiguration.
        run(
            "ip",
            &[
                "netns",
                "exec",
                &wire,
                "sysctl",
                "-q",
                "-w",
                "net.ipv6.conf.all.disable_ipv6=1",
            ],
        );
        let (wan_link, toward_router) = self.veth(&router_ns);
        run("ip", &["link", "set", &toward_router, "netns", &wire]);
        let (toward_public, bridge_port) = self.veth(&wire);
        self.plug_into_bridge(&bridge_port);
        run("ip", &["-n", &wire, "link", "set", &toward_router, "up"]);
        run(
            "ip",
            &[
                "-n",
                &router_ns,
                "addr",
                "add",
                &format!("{ip}/24"),
                "dev",
                &wan_link,
            ],
        );
        let forwarder = Host {
            ns: wire,
            ip: String::new(),
        }
        .start(
            &format!("delay{index}"),
            &crate::bin("tests", "delay_link"),
            &[toward_router, toward_public],
        );
        let mut home = self.home_behind(index, Host { ns: router_ns, ip }, wan_link);
        home.delay = Some(forwarder);
        home
    }

    /// The home network behind `router`, whose link to the public network is `wan_link`.
    fn home_behind(&mut self, index: u8, router: Host, wan_link: String) -> Home {
        let lan_bridge = format!("{}l{index}", self.prefix);
        let ns = router.ns.clone();
        run(
            "ip",
            &["-n", &ns, "link", "add", &lan_bridge, "type", "bridge"],
        );
        run(
            "ip",
            &[
                "-n",
                &ns,
                "addr",
                "add",
                &format!("10.{index}.0.1/24"),
                "dev",
                &lan_bridge,
            ],
        );
        run("ip", &["-n", &ns, "link", "set", &lan_bridge, "up"]);
        router.run("sysctl", &["-q", "-w", "net.ipv4.ip_forward=1"]);
        let rules = format!(
            "table ip nat {{
               chain postrouting {{ type nat hook postrouting priority srcnat; oifname \"{wan_link}\" masquerade; }}
             }}
             table inet home {{
               chain forward {{ type filter hook forward priority filter; policy accept;
                 iifname \"{wan_link}\" ct state established,related accept
                 iifname \"{wan_link}\" drop
               }}
               chain input {{ type filter hook input priority filter; policy accept;
                 iifname \"{wan_link}\" ct state established,related accept
                 iifname \"{wan_link}\" drop
               }}
               chain cut {{ type filter hook forward priority filter - 1; policy accept; }}
             }}"
        );
        router.run("nft", &[&rules]);
        Home {
            index,
            router,
            lan_bridge,
            wan_link,
            hosts: 0,
            delay: None,
        }
    }

    /// A host in `home` at 10.H.0.(2 + n), its default route through the router.
    pub fn home_host(&mut self, home: &mut Home, name: &str) -> Host {
        let ns = self.namespace(name);
        home.hosts += 1;
        let ip = format!("10.{}.0.{}", home.index, 1 + home.hosts);
        let (inner, outer) = self.veth(&ns);
        run("ip", &["link", "set", &outer, "netns", &home.router.ns]);
        let r = home.router.ns.clone();
        run(
            "ip",
            &["-n", &r, "link", "set", &outer, "master", &home.lan_bridge],
        );
        run("ip", &["-n", &r, "link", "set", &outer, "up"]);
        run(
            "ip",
            &["-n", &ns, "addr", "add", &format!("{ip}/24"), "dev", &inner],
        );
        run(
            "ip",
            &[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.{}.0.1", home.index),
            ],
        );
        Host { ns, ip }
    }
}

impl Home {
    /// Drop UDP from this home to every public address but `except`'s (the rendezvous host):
    /// no hole can be punched to another home, so only the relay (TCP) joins them.
    pub fn block_udp_except_to(&self, except: &Host) {
        self.router.run(
            "nft",
            &[
                "add",
                "rule",
                "inet",
                "home",
                "forward",
                "oifname",
                &self.wan_link,
                "ip",
                "daddr",
                "!=",
                &except.ip,
                "meta",
                "l4proto",
                "udp",
                "drop",
            ],
        );
    }
}

impl Home {
    /// Set the one-way delay (each direction) of this home's link to the public network, for
    /// a home made by [`Internet::home_with_delay`]; returns once the wire delays new frames.
    pub fn set_delay(&mut self, delay: std::time::Duration) {
        use std::io::Write;
        let forwarder = self
            .delay
            .as_mut()
            .expect("set_delay on a home without a delay link: make it with home_with_delay");
        let ms = delay.as_secs_f64() * 1000.0;
        let said = forwarder.stdout_lines().len();
        let stdin = forwarder.child.stdin.as_mut().expect("delay_link's stdin");
        writeln!(stdin, "{ms}")
            .and_then(|()| stdin.flush())
            .expect("telling delay_link its delay");
        crate::wait_for(
            "delay_link to take the delay",
            std::time::Duration::from_secs(10),
            || (forwarder.stdout_lines().len() > said).then_some(()),
        );
    }

    /// Reset every TCP connection from this home to `host`:`port` and refuse new ones (a
    /// TCP reset answers each packet), until [`Home::mend`].
    pub fn cut_tcp_to(&self, host: &Host, port: u16) {
        let rule = format!(
            "add rule inet home cut oifname \"{}\" ip daddr {} tcp dport {port} reject with tcp reset",
            self.wan_link, host.ip
        );
        self.router.run("nft", &[&rule]);
    }

    /// Undo [`Home::cut_tcp_to`].
    pub fn mend(&self) {
        self.router.run("nft", &["flush chain inet home cut"]);
    }
}

impl Default for Internet {
    fn default() -> Internet {
        Internet::new()
    }
}

impl Drop for Internet {
    fn drop(&mut self) {
        for ns in &self.namespaces {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .status();
    }
}
