//! Per-site networks: every sandboxed deployment runs in a network
//! namespace of its own, joined to the host by a veth pair.
//!
//! ```text
//!   host                                   site's namespace (commons-UID)
//!   cmsiteUID  10.200.n.1/30  <── veth ──>  eth0  10.200.n.2/30, lo 127.0.0.1
//! ```
//!
//! - Apps listen on 127.0.0.1 inside their namespace, as they would alone
//!   on a machine; the components of one deployment share it and reach each
//!   other there. Traffic that reaches `eth0` for the site's address is
//!   turned to 127.0.0.1 (DNAT, with `route_localnet` on `eth0`), so the
//!   gateway and health checks reach an app at `SITE_IP:PORT`.
//! - The host's firewall (the nftables table `inet commons`, which the
//!   platform owns and rewrites whole) drops everything a site sends to the
//!   host and to other sites, and what it sends to loopback, private,
//!   link-local and multicast ranges; it lets through replies, DNS to the
//!   host's resolvers, the internet (masqueraded), and — for sites with a
//!   `postgres:` component only — their platform's PostgreSQL server at
//!   `HOST_IP:5432` ([`SITE_POSTGRES_PORT`]): the map `@postgres_server`
//!   sends each such site's address to its own platform's server (the
//!   grant is kept beside the site, so a network made again after a restart
//!   of the host gets it back; [`grant_postgres`]). PostgreSQL
//!   sees the site's own address, so `pg_hba.conf` tells sites from the
//!   platform's own connections (`host sameuser all 10.200.0.0/14
//!   scram-sha-256`).
//!   Likewise, for sites with a `data:` section only, their own platform's
//!   data API at `HOST_IP:8072` ([`SITE_DATA_PORT`]): the map `@data_api`
//!   sends each such site's address to its platform's loopback listener
//!   (which serves the data API and nothing else), so a site reaches no
//!   other port of the host's loopback, and no other platform's data API
//!   on the same host; such a site's workloads are told where in
//!   `COMMONS_DATA_URL`.
//!
//! The rules name no platform's port or server (those are in the maps), so
//! every process of the host — the daemons of several platforms, a CLI
//! deploying — writes the same ruleset, and none undoes another's.
//!
//! The namespace and its link are made with iproute2 (`ip`) and the rules
//! with `nft`, the tools an operator reads them back with.

use std::collections::BTreeMap;
use std::io::Write;
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;

/// Where `ip netns` keeps named namespaces.
pub const NETNS_DIR: &str = "/run/netns";
/// Which deployment (of which platform home) has which link: host-wide,
/// like the namespaces and addresses themselves, and gone at reboot with them.
pub const REGISTRY_DIR: &str = "/run/commons";
/// The nftables table the platform owns on the host.
pub const TABLE: &str = "commons";
/// The block sites' addresses come from by default: a /30 per deployment,
/// 65,536 deployments.
pub const DEFAULT_NETWORK: Network = Network {
    base: Ipv4Addr::new(10, 200, 0, 0),
    prefix: 14,
};

/// Where a site with a `data:` section reaches its platform's data API, on
/// its host address, whatever port the platform's listener has on loopback.
pub const SITE_DATA_PORT: u16 = 8072;

/// Where a site with a `postgres:` component reaches its platform's
/// PostgreSQL server, on its host address, wherever the server listens.
pub const SITE_POSTGRES_PORT: u16 = 5432;

/// Ranges a site never reaches, whatever its egress: loopback, private,
/// shared (CGNAT), link-local, multicast and reserved.
const NEVER: &str = "0.0.0.0/8, 10.0.0.0/8, 100.64.0.0/10, 127.0.0.0/8, 169.254.0.0/16, \
                     172.16.0.0/12, 192.0.0.0/24, 192.168.0.0/16, 198.18.0.0/15, 224.0.0.0/3";

/// The block of addresses sites' links are numbered from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Network {
    pub base: Ipv4Addr,
    pub prefix: u8,
}

impl Default for Network {
    fn default() -> Network {
        DEFAULT_NETWORK
    }
}

impl std::fmt::Display for Network {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.base, self.prefix)
    }
}

impl std::str::FromStr for Network {
    type Err = String;

    fn from_str(s: &str) -> Result<Network, String> {
        let fix = "say an IPv4 block like 10.200.0.0/14";
        let (ip, prefix) = s.split_once('/').ok_or_else(|| format!("{s:?}: {fix}"))?;
        let base: Ipv4Addr = ip.parse().map_err(|_| format!("{s:?}: {fix}"))?;
        let prefix: u8 = prefix.parse().map_err(|_| format!("{s:?}: {fix}"))?;
        if !(8..=28).contains(&prefix) {
            return Err(format!(
                "{s:?}: the prefix must be 8 to 28 (a /30 per site)"
            ));
        }
        if u32::from(base) & !(u32::MAX << (32 - prefix)) != 0 {
            return Err(format!("{s:?}: {ip} is not the start of a /{prefix}"));
        }
        if !base.is_private() {
            return Err(format!(
                "{s:?}: use a private block (10/8, 172.16/12, 192.168/16)"
            ));
        }
        Ok(Network { base, prefix })
    }
}

impl Network {
    /// How many sites' links fit.
    pub fn capacity(&self) -> u32 {
        1 << (32 - self.prefix - 2)
    }
}

/// One deployment's network: its namespace, its link and addresses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SiteNet {
    /// The namespace's name (`ip netns`): `commons-N`.
    pub netns: String,
    /// The host's end of the link: `cmsiteN`.
    pub host_if: String,
    /// The host's address on the link: the site's gateway.
    pub host_ip: Ipv4Addr,
    /// The site's address, where the gateway reaches its apps.
    pub site_ip: Ipv4Addr,
}

impl SiteNet {
    /// The `index`th site network in `network`.
    pub fn of(index: u32, network: Network) -> std::io::Result<SiteNet> {
        if index >= network.capacity() {
            return Err(std::io::Error::other(format!(
                "no room for a {}th site network in {network} ([runtime] network: a larger block)",
                index + 1
            )));
        }
        let link = u32::from(network.base) + index * 4;
        Ok(SiteNet {
            netns: format!("commons-{index}"),
            host_if: format!("cmsite{index}"),
            host_ip: Ipv4Addr::from(link + 1),
            site_ip: Ipv4Addr::from(link + 2),
        })
    }

    /// The namespace's file, which the sandbox helper joins.
    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.netns)
    }

    /// Whether the namespace and its link exist.
    pub fn exists(&self) -> bool {
        self.netns_path().exists()
            && std::path::Path::new("/sys/class/net")
                .join(&self.host_if)
                .exists()
    }
}

fn run(program: &str, args: &[&str], stdin: Option<&str>) -> std::io::Result<()> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!(
                    "cannot run `{program}` ({e}): per-site networks need iproute2 and nftables"
                ),
            )
        })?;
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes())?;
    }
    let out = child.wait_with_output()?;
    if out.status.success() {
        return Ok(());
    }
    Err(std::io::Error::other(format!(
        "`{program} {}` failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    )))
}

/// Links the namespace `inner` to `outer` (the host's when `None`): a veth
/// pair, `outer_if` at `outer_ip` on the outer side, `eth0` at `inner_ip`
/// inside (a /30), whose default route is the outer side.
fn link(
    outer: Option<&str>,
    outer_if: &str,
    outer_ip: Ipv4Addr,
    inner: &str,
    inner_ip: Ipv4Addr,
) -> std::io::Result<()> {
    let mut args = vec!["-batch", "-"];
    if let Some(ns) = outer {
        args.splice(0..0, ["-n", ns]);
    }
    run(
        "ip",
        &args,
        Some(&format!(
            "link add {outer_if} type veth peer name eth0 netns {inner}\n\
             addr add {outer_ip}/30 dev {outer_if}\n\
             link set {outer_if} up\n"
        )),
    )?;
    run(
        "ip",
        &["-n", inner, "-batch", "-"],
        Some(&format!(
            "link set lo up\n\
             addr add {inner_ip}/30 dev eth0\n\
             link set eth0 up\n\
             route add default via {outer_ip}\n"
        )),
    )
}

/// Serialises set-ups within this process (two components of one site
/// start at once); across processes, `ip netns add` fails for the loser,
/// which then finds the namespace made.
static SETTING_UP: Mutex<()> = Mutex::new(());

/// Makes `net` (idempotent): the namespace, the link, the addresses, the
/// route, and the rule that hands the site's address to its loopback. The
/// host's firewall must be in place first ([`Firewall::install`]).
pub fn ensure(net: &SiteNet) -> std::io::Result<()> {
    if net.exists() {
        return Ok(());
    }
    let _one = SETTING_UP.lock().unwrap_or_else(|p| p.into_inner());
    if net.exists() {
        return Ok(());
    }
    // A link made can vanish before it is brought up (seen once under a
    // loaded suite: "RTNETLINK answers: No such device"); a second attempt
    // from a clean slate settles it.
    let mut made = Ok(());
    for _ in 0..2 {
        made = make(net);
        if made.is_ok() {
            return made;
        }
        remove(net);
    }
    made
}

/// One attempt at [`ensure`], under its lock.
fn make(net: &SiteNet) -> std::io::Result<()> {
    // Whatever a failed attempt left goes first.
    let _ = run("ip", &["link", "del", &net.host_if], None);
    let _ = run("ip", &["netns", "del", &net.netns], None);
    (|| {
        run("ip", &["netns", "add", &net.netns], None)?;
        link(None, &net.host_if, net.host_ip, &net.netns, net.site_ip)?;
        // The host's end may carry traffic DNATed to its loopback (the
        // PostgreSQL path); the firewall decides whether any does.
        std::fs::write(
            format!("/proc/sys/net/ipv4/conf/{}/route_localnet", net.host_if),
            "1",
        )?;
        // No IPv6 on the link at all (the firewall drops it too): no
        // link-local way to the host's services bound to [::]. (Absent when
        // the kernel has IPv6 off.)
        let _ = std::fs::write(
            format!("/proc/sys/net/ipv6/conf/{}/disable_ipv6", net.host_if),
            "1",
        );
        // Inside: what arrives for the site's address goes to its loopback,
        // where its apps listen, or to an image instance's namespace.
        in_site(net, "", &site_table(net))
    })()
}

/// The site namespace's own rules, whole (rewritten, not appended to; the
/// map of image instances keeps its elements): what arrives on `eth0` for
/// the site's address goes to the image instance its port names, or else to
/// the namespace's loopback; instances' traffic leaves as the site's own.
fn site_table(net: &SiteNet) -> String {
    let sip = net.site_ip;
    format!(
        "add table ip {TABLE}\n\
         add map ip {TABLE} instances {{ type inet_service : ipv4_addr . inet_service; }}\n\
         add chain ip {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
         add chain ip {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
         flush chain ip {TABLE} prerouting\n\
         flush chain ip {TABLE} postrouting\n\
         add rule ip {TABLE} prerouting iifname \"eth0\" ip daddr {sip} dnat ip to tcp dport map @instances\n\
         add rule ip {TABLE} prerouting iifname \"eth0\" ip daddr {sip} dnat ip to 127.0.0.1\n\
         add rule ip {TABLE} postrouting oifname \"eth0\" ip saddr {INSTANCE_BLOCK}/16 masquerade\n"
    )
}

/// Runs `nft -f -` with `rules` in the namespace `netns`, after turning on
/// `route_localnet` (and off IPv6) on its interface `link` (`eth0` when
/// empty) and, in a site's namespace, forwarding for its image instances.
fn in_site(net: &SiteNet, link: &str, rules: &str) -> std::io::Result<()> {
    in_namespace(
        &net.netns,
        if link.is_empty() { "eth0" } else { link },
        true,
        rules,
    )
}

fn in_namespace(netns: &str, link: &str, forward: bool, rules: &str) -> std::io::Result<()> {
    let forward = if forward {
        "echo 1 > /proc/sys/net/ipv4/ip_forward && "
    } else {
        ""
    };
    run(
        "ip",
        &[
            "netns",
            "exec",
            netns,
            "/bin/sh",
            "-c",
            &format!(
                "{forward}echo 1 > /proc/sys/net/ipv4/conf/{link}/route_localnet && \
                 {{ echo 1 > /proc/sys/net/ipv6/conf/{link}/disable_ipv6; }} 2>/dev/null; \
                 exec nft -f -"
            ),
        ],
        Some(rules),
    )
}

/// Image instances' links inside a site's namespace are numbered from this
/// /16 (a /30 each); it is never seen outside, where they are the site.
const INSTANCE_BLOCK: Ipv4Addr = Ipv4Addr::new(172, 31, 0, 0);
/// An instance in slot S is reached at the site's address, port FIRST + S.
const INSTANCE_FIRST_PORT: u16 = 10_000;
/// How many image instances a site runs at once (several components, each
/// replaced start-first).
const INSTANCE_SLOTS: u16 = 1_000;

/// One image instance's network: a namespace of its own behind its site's
/// (the container's port is fixed by its image, so two versions of it can
/// only run at once in two namespaces), reached from the host at the site's
/// address on a port of its own.
///
/// ```text
///   host ── cmsiteN ── site's namespace (commons-N) ── ciS ── eth0  commons-N-S
///            SITE_IP:10000+S  ──dnat──>  172.31.x.2:PORT  ──dnat──>  127.0.0.1:PORT
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InstanceNet {
    /// `commons-N-S`.
    pub netns: String,
    /// The site's end of the link, in the site's namespace: `ciS`.
    pub site_if: String,
    pub site_side_ip: Ipv4Addr,
    /// The instance's address inside its site: where its site's other
    /// components reach it.
    pub ip: Ipv4Addr,
    /// The port on the site's address that reaches it.
    pub site_port: u16,
}

impl InstanceNet {
    fn of(site: &SiteNet, slot: u16) -> InstanceNet {
        InstanceNet {
            netns: format!("{}-{slot}", site.netns),
            site_if: format!("ci{slot}"),
            site_side_ip: InstanceNet::link_ip(slot, 1),
            ip: InstanceNet::link_ip(slot, 2),
            site_port: INSTANCE_FIRST_PORT + slot,
        }
    }

    /// Address `n` of slot `slot`'s /30 (1: the site's end, 2: the instance).
    fn link_ip(slot: u16, n: u32) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(INSTANCE_BLOCK) + slot as u32 * 4 + n)
    }

    /// The site and slot a name `commons-N-S` stands for.
    fn parse(name: &str) -> Option<(u32, u16)> {
        let (index, slot) = name.strip_prefix("commons-")?.split_once('-')?;
        Some((index.parse().ok()?, slot.parse().ok()?))
    }

    pub fn netns_path(&self) -> PathBuf {
        PathBuf::from(NETNS_DIR).join(&self.netns)
    }
}

/// A new network behind `site` for an image instance listening on `port`
/// inside: the lowest free slot, linked, numbered and reachable at the
/// site's address; the one named `prefer` first if it is free. Undone by
/// [`remove_instance`].
pub fn instance_network(
    site: &SiteNet,
    port: u16,
    prefer: Option<&str>,
) -> std::io::Result<InstanceNet> {
    let _one = SETTING_UP.lock().unwrap_or_else(|p| p.into_inner());
    let preferred = prefer
        .and_then(InstanceNet::parse)
        .filter(|(index, _)| format!("commons-{index}") == site.netns)
        .map(|(_, slot)| slot);
    for slot in preferred.into_iter().chain(0..INSTANCE_SLOTS) {
        let inst = InstanceNet::of(site, slot);
        // Taken here or, across processes, by whoever made it first.
        if inst.netns_path().exists() || run("ip", &["netns", "add", &inst.netns], None).is_err() {
            continue;
        }
        let made = (|| {
            link(
                Some(&site.netns),
                &inst.site_if,
                inst.site_side_ip,
                &inst.netns,
                inst.ip,
            )?;
            // Apps bound to the instance's loopback are reached too.
            in_namespace(
                &inst.netns,
                "eth0",
                false,
                &format!(
                    "table ip {TABLE} {{\n\
                       chain prerouting {{\n\
                         type nat hook prerouting priority dstnat; policy accept;\n\
                         iifname \"eth0\" ip daddr {ip} dnat to 127.0.0.1\n\
                       }}\n\
                     }}\n",
                    ip = inst.ip
                ),
            )?;
            in_site(
                site,
                &inst.site_if,
                &format!(
                    "{}add element ip {TABLE} instances {{ {} : {} . {port} }}\n",
                    site_table(site),
                    inst.site_port,
                    inst.ip
                ),
            )
        })();
        return match made {
            Ok(()) => Ok(inst),
            Err(e) => {
                remove_instance(&inst.netns);
                Err(e)
            }
        };
    }
    Err(std::io::Error::other(format!(
        "{} already runs {INSTANCE_SLOTS} image instances",
        site.netns
    )))
}

/// The address of the image instance whose network is named `netns`.
pub fn instance_ip(netns: &str) -> Option<Ipv4Addr> {
    InstanceNet::parse(netns).map(|(_, slot)| InstanceNet::link_ip(slot, 2))
}

/// Removes the image instance's network named `netns` (`commons-N-S`): its
/// namespace, with its link, and its port on the site's address.
pub fn remove_instance(netns: &str) {
    let Some((index, slot)) = InstanceNet::parse(netns) else {
        return;
    };
    let site = format!("commons-{index}");
    let _ = run(
        "ip",
        &[
            "netns",
            "exec",
            &site,
            "nft",
            "delete",
            "element",
            "ip",
            TABLE,
            "instances",
            &format!("{{ {} }}", INSTANCE_FIRST_PORT + slot),
        ],
        None,
    );
    let _ = run("ip", &["netns", "del", netns], None);
}

/// The image instances' networks behind the site network `net`.
fn instances_of(net: &SiteNet) -> Vec<String> {
    let prefix = format!("{}-", net.netns);
    std::fs::read_dir(NETNS_DIR)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(&prefix) && InstanceNet::parse(n).is_some())
        .collect()
}

/// The registry's key for a deployment: several platforms (homes) may
/// share a host.
fn registry_key(home: &Path, deployment: &str) -> String {
    let home = std::fs::canonicalize(home).unwrap_or_else(|_| home.to_path_buf());
    format!("{}#{deployment}", home.display())
}

/// The host's registry of site networks: which key holds which index, one
/// small file per entry each way, so a look-up costs the same with 10 or
/// 50,000 sites (`by-key/HASH` holds "INDEX KEY", `by-index/INDEX` the key;
/// `lowest-free` where a search for a free index starts).
struct Registry {
    dir: PathBuf,
}

impl Registry {
    fn open() -> std::io::Result<Registry> {
        Registry::at(&Path::new(REGISTRY_DIR).join("networks"))
    }

    fn at(dir: &Path) -> std::io::Result<Registry> {
        let dir = dir.to_path_buf();
        std::fs::create_dir_all(dir.join("by-key"))?;
        std::fs::create_dir_all(dir.join("by-index"))?;
        Ok(Registry { dir })
    }

    /// Runs `f` under the registry's lock (allocating and freeing).
    fn locked<T>(&self, f: impl FnOnce() -> std::io::Result<T>) -> std::io::Result<T> {
        use std::os::unix::io::AsRawFd;
        let lock = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(self.dir.join("lock"))?;
        // SAFETY: flock on a descriptor `lock` owns for the whole call.
        if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        f()
    }

    /// The by-key file of `key` (probing past the rare hash collision) and
    /// the index it holds, if any.
    fn find(&self, key: &str) -> (PathBuf, Option<u32>) {
        let mut h: u64 = 0xcbf29ce484222325;
        for b in key.bytes() {
            h = (h ^ b as u64).wrapping_mul(0x100000001b3);
        }
        for probe in 0.. {
            let path = self.dir.join("by-key").join(format!("{h:016x}.{probe}"));
            let Ok(text) = std::fs::read_to_string(&path) else {
                return (path, None);
            };
            if let Some((index, k)) = text.split_once(' ') {
                if k == key {
                    return (path, index.parse().ok());
                }
            }
        }
        unreachable!("probing ends at a free name")
    }

    fn lowest_free(&self) -> u32 {
        std::fs::read_to_string(self.dir.join("lowest-free"))
            .ok()
            .and_then(|t| t.trim().parse().ok())
            .unwrap_or(0)
    }

    /// The index of `key`, allocated (the lowest free) if it has none;
    /// true if newly allocated.
    fn index_for(&self, key: &str) -> std::io::Result<(u32, bool)> {
        if let (_, Some(i)) = self.find(key) {
            return Ok((i, false));
        }
        self.locked(|| {
            let (path, found) = self.find(key);
            if let Some(i) = found {
                return Ok((i, false));
            }
            let by_index = self.dir.join("by-index");
            let free = (self.lowest_free()..)
                .find(|i| !by_index.join(i.to_string()).exists())
                .expect("a free index");
            crate::layout::write_whole(&by_index.join(free.to_string()), key.as_bytes())?;
            crate::layout::write_whole(&path, format!("{free} {key}").as_bytes())?;
            crate::layout::write_whole(
                &self.dir.join("lowest-free"),
                (free + 1).to_string().as_bytes(),
            )?;
            Ok((free, true))
        })
    }

    /// Frees `key`'s index; returns it.
    fn free(&self, key: &str) -> std::io::Result<Option<u32>> {
        self.locked(|| {
            let (path, found) = self.find(key);
            let Some(index) = found else {
                return Ok(None);
            };
            std::fs::remove_file(&path)?;
            let _ = std::fs::remove_file(self.dir.join("by-index").join(index.to_string()));
            if index < self.lowest_free() {
                crate::layout::write_whole(
                    &self.dir.join("lowest-free"),
                    index.to_string().as_bytes(),
                )?;
            }
            Ok(Some(index))
        })
    }
}

/// The index of `deployment`'s network (of the platform at `home`), if it
/// has one: its namespace is `commons-INDEX`, its host link `cmsiteINDEX`.
pub fn site_index(home: &Path, deployment: &str) -> Option<u32> {
    Registry::open()
        .ok()?
        .find(&registry_key(home, deployment))
        .1
}

/// The network of `deployment` (of the platform at `home`): the lowest free
/// index, allocated once. A newly allocated one starts clean: whatever a
/// former holder of the index left (a namespace, a link, a place in the
/// firewall's sets) is removed first, so no right passes to the next site.
pub fn site_net(home: &Path, deployment: &str) -> std::io::Result<SiteNet> {
    let _making = MAKING.lock().unwrap_or_else(|p| p.into_inner());
    site_net_locked(home, deployment)
}

/// One site's network made at a time in this process. A deploy starts its
/// jobs and drivers at once, each asking for the site's network: the first
/// to allocate the index clears it (`remove`), and that must not undo a
/// namespace another of them has just made and started a workload in —
/// whose network would then be gone for its whole life.
static MAKING: Mutex<()> = Mutex::new(());

fn site_net_locked(home: &Path, deployment: &str) -> std::io::Result<SiteNet> {
    let (index, new) = Registry::open()?.index_for(&registry_key(home, deployment))?;
    let net = SiteNet::of(index, crate::settings::current().network)?;
    if new {
        remove(&net);
    }
    Ok(net)
}

/// The network of `deployment` under the settings in force, made if
/// needed, with egress to the internet if `egress`.
pub fn site_network(home: &Path, deployment: &str, egress: bool) -> std::io::Result<SiteNet> {
    let settings = crate::settings::current();
    let _making = MAKING.lock().unwrap_or_else(|p| p.into_inner());
    let net = site_net_locked(home, deployment)?;
    settings.firewall().install()?;
    if !net.exists() {
        ensure(&net)?;
        // Made again (the host restarted, say): its databases' way back,
        // which only a deploy of the database would give it otherwise.
        if has_postgres_grant(home, deployment) {
            if let Some(server) = settings.postgres_server() {
                allow_postgres(&net, server)?;
            }
        }
    }
    sync(&net, Allowance::Egress, egress)?;
    Ok(net)
}

/// Where a site's standing grants to its platform's PostgreSQL server are
/// kept: a file per component holding a database there. Beside the site's
/// data, so they outlive the host's networks and rules (gone at a restart),
/// and go with the site.
fn postgres_grants(home: &Path, deployment: &str) -> PathBuf {
    crate::layout::Layout::new(home)
        .deployment_dir(deployment)
        .join("grants")
        .join("postgres")
}

fn has_postgres_grant(home: &Path, deployment: &str) -> bool {
    std::fs::read_dir(postgres_grants(home, deployment))
        .map(|mut entries| entries.next().is_some())
        .unwrap_or(false)
}

/// Lets `deployment`'s network reach its platform's PostgreSQL server for
/// its database `component`, now and whenever the network is made again.
pub fn grant_postgres(
    home: &Path,
    deployment: &str,
    component: &str,
    net: &SiteNet,
    server: SocketAddrV4,
) -> std::io::Result<()> {
    let dir = postgres_grants(home, deployment);
    std::fs::create_dir_all(&dir)?;
    crate::layout::write_whole(&dir.join(component), b"")?;
    allow_postgres(net, server)
}

/// Takes back [`grant_postgres`] for `component`; the way to the server
/// closes with the site's last database there.
pub fn revoke_postgres(
    home: &Path,
    deployment: &str,
    component: &str,
    net: &SiteNet,
) -> std::io::Result<()> {
    match std::fs::remove_file(postgres_grants(home, deployment).join(component)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    if has_postgres_grant(home, deployment) {
        return Ok(());
    }
    allow(net, Allowance::Postgres, false)
}

/// What this process last put in the firewall's set (`@egress_sites`) and
/// map (`@data_api`: the port), by namespace:
/// forgotten when a namespace is removed (its index may go to another site).
static SYNCED: Mutex<BTreeMap<(String, Allowance), Option<u16>>> = Mutex::new(BTreeMap::new());

/// Lets `deployment`'s network out to the internet or not, if it has one.
pub fn set_egress(home: &Path, deployment: &str, egress: bool) -> std::io::Result<()> {
    let Some(index) = site_index(home, deployment) else {
        return Ok(());
    };
    let net = SiteNet::of(index, crate::settings::current().network)?;
    if net.exists() {
        crate::settings::current().firewall().install()?;
        sync(&net, Allowance::Egress, egress)?;
    }
    Ok(())
}

/// Puts the site in or out of `what`'s set, asking nft only when this
/// process has not set it so already.
fn sync(net: &SiteNet, what: Allowance, yes: bool) -> std::io::Result<()> {
    sync_grant(net, what, yes.then_some(0))
}

/// [`sync`], for a grant that may carry a port (the data API's).
fn sync_grant(net: &SiteNet, what: Allowance, grant: Option<u16>) -> std::io::Result<()> {
    let mut synced = SYNCED.lock().unwrap_or_else(|p| p.into_inner());
    let key = (net.netns.clone(), what);
    if synced.get(&key) == Some(&grant) {
        return Ok(());
    }
    match (what, grant) {
        (Allowance::Data, Some(port)) => allow_data(net, port)?,
        _ => allow(net, what, grant.is_some())?,
    }
    synced.insert(key, grant);
    Ok(())
}

/// Removes the network of `deployment`, if it has one (it was destroyed),
/// and frees its index.
pub fn remove_site(home: &Path, deployment: &str) {
    let Some(index) = site_index(home, deployment) else {
        return;
    };
    // Removed before the index is freed: freed first, another site could
    // take the index and make its namespace, which this removal would then
    // take away from under it.
    if let Ok(net) = SiteNet::of(index, crate::settings::current().network) {
        remove(&net);
    }
    let _ = Registry::open().and_then(|r| r.free(&registry_key(home, deployment)));
}

/// Removes `net`'s namespace and link (the link goes with the namespace's
/// end; both are asked for in case one was left alone), and its place in
/// the firewall's sets.
pub fn remove(net: &SiteNet) {
    SYNCED
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .retain(|(netns, _), _| *netns != net.netns);
    for instance in instances_of(net) {
        let _ = run("ip", &["netns", "del", &instance], None);
    }
    let _ = run("ip", &["netns", "del", &net.netns], None);
    let _ = run("ip", &["link", "del", &net.host_if], None);
    for what in [Allowance::Postgres, Allowance::Egress, Allowance::Data] {
        let _ = allow(net, what, false);
    }
}

/// Lets `net` reach the internet (`egress`), or stops it; `postgres` and
/// `data` here only stop it (see [`grant_postgres`], [`allow_data`]).
pub fn allow(net: &SiteNet, what: Allowance, yes: bool) -> std::io::Result<()> {
    let set = match what {
        Allowance::Egress => "egress_sites",
        Allowance::Postgres | Allowance::Data if yes => {
            return Err(std::io::Error::other(
                "the way to a platform's service names it (grant_postgres, allow_data)",
            ))
        }
        Allowance::Postgres => "postgres_server",
        Allowance::Data => "data_api",
    };
    let verb = if yes { "add" } else { "delete" };
    let r = run(
        "nft",
        &[
            verb,
            "element",
            "inet",
            TABLE,
            set,
            &format!("{{ {} }}", net.site_ip),
        ],
        None,
    );
    // Deleting what is not there is no failure.
    if yes {
        r
    } else {
        Ok(())
    }
}

/// Sends `net`'s connections to its host address at `port` on to `to`,
/// through `map`, replacing what the map held for the site's address (left
/// by a platform since restarted, or by another one).
fn map_site(net: &SiteNet, what: Allowance, map: &str, to: SocketAddrV4) -> std::io::Result<()> {
    allow(net, what, false)?;
    let element = format!("{{ {} : {} . {} }}", net.site_ip, to.ip(), to.port());
    run(
        "nft",
        &["add", "element", "inet", TABLE, map, &element],
        None,
    )
}

/// Lets `net` reach its platform's PostgreSQL server `server` at
/// `HOST_IP:`[`SITE_POSTGRES_PORT`], and no other server (for this network
/// as it is: [`grant_postgres`] keeps it).
fn allow_postgres(net: &SiteNet, server: SocketAddrV4) -> std::io::Result<()> {
    map_site(net, Allowance::Postgres, "postgres_server", server)
}

/// Lets `net` reach its platform's data API, listening on loopback at
/// `port`: the site's address maps to `127.0.0.1:port` and nothing else.
fn allow_data(net: &SiteNet, port: u16) -> std::io::Result<()> {
    map_site(
        net,
        Allowance::Data,
        "data_api",
        SocketAddrV4::new(Ipv4Addr::LOCALHOST, port),
    )
}

/// What a site may reach beyond the gateway's requests.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Allowance {
    Egress,
    Postgres,
    Data,
}

/// `COMMONS_DATA_URL` for a site's workloads: the platform's data API
/// (`api`, on loopback) as they reach it — at their host address when
/// the site has a network of its own (`net`, which is then let through
/// to it), else directly. None when the site declared no `data:` (a
/// sandboxed one is then kept from it) or the platform serves none.
pub fn data_api_url(
    api: Option<SocketAddrV4>,
    net: Option<&SiteNet>,
    wanted: bool,
) -> std::io::Result<Option<String>> {
    let api = api.filter(|_| wanted);
    if let Some(net) = net {
        sync_grant(net, Allowance::Data, api.map(|a| a.port()))?;
    }
    Ok(api.map(|api| match net {
        Some(net) => format!("http://{}:{SITE_DATA_PORT}", net.host_ip),
        None => format!("http://{api}"),
    }))
}

/// The host's rules for all sites' links. They name no platform's server
/// or port: which site reaches which is in the maps, so every process of
/// the host writes the same ruleset and none undoes another's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Firewall {
    pub network: Network,
    /// The host's DNS resolvers, which sites may ask.
    pub resolvers: Vec<Ipv4Addr>,
}

impl Firewall {
    /// The host's resolvers, from `/etc/resolv.conf` (loopback ones are the
    /// host's own and unreachable from a site).
    pub fn host_resolvers() -> Vec<Ipv4Addr> {
        std::fs::read_to_string("/etc/resolv.conf")
            .unwrap_or_default()
            .lines()
            .filter_map(|l| l.trim().strip_prefix("nameserver"))
            .filter_map(|ip| ip.trim().parse::<Ipv4Addr>().ok())
            .filter(|ip| !ip.is_loopback())
            .collect()
    }

    /// The ruleset, whole: table `inet commons`, replaced atomically except
    /// its sets (which sites are in them is kept).
    pub fn ruleset(&self) -> String {
        let net = self.network;
        // A site in `@postgres_server` reaches its platform's server at its
        // host address; one in `@data_api` its platform's data API (which
        // listens on IPv4 loopback only: `commons serve` refuses anything
        // else). An address not in a map is not turned, and its packets
        // meet the drop below. Only these rules turn a site's connection to
        // those ports, so the connections they turned are let in.
        let mut pre = String::new();
        let mut input = String::new();
        for (port, map) in [
            (SITE_POSTGRES_PORT, "postgres_server"),
            (SITE_DATA_PORT, "data_api"),
        ] {
            pre.push_str(&format!(
                "    iifname \"cmsite*\" ip daddr {net} tcp dport {port} dnat ip to ip saddr map @{map}\n"
            ));
            input.push_str(&format!(
                "    iifname \"cmsite*\" meta l4proto tcp ct status dnat ct original proto-dst {port} accept\n"
            ));
        }
        let dns = if self.resolvers.is_empty() {
            String::new()
        } else {
            let list = self
                .resolvers
                .iter()
                .map(|r| r.to_string())
                .collect::<Vec<_>>()
                .join(", ");
            format!(
                "    iifname \"cmsite*\" ip daddr {{ {list} }} udp dport 53 accept\n\
                 \x20   iifname \"cmsite*\" ip daddr {{ {list} }} tcp dport 53 accept\n"
            )
        };
        format!(
            "add table inet {TABLE}\n\
             add set inet {TABLE} egress_sites {{ type ipv4_addr; }}\n\
             add map inet {TABLE} postgres_server {{ type ipv4_addr : ipv4_addr . inet_service; }}\n\
             add map inet {TABLE} data_api {{ type ipv4_addr : ipv4_addr . inet_service; }}\n\
             add chain inet {TABLE} prerouting {{ type nat hook prerouting priority dstnat; policy accept; }}\n\
             add chain inet {TABLE} input {{ type filter hook input priority filter - 10; policy accept; }}\n\
             add chain inet {TABLE} forward {{ type filter hook forward priority filter - 10; policy accept; }}\n\
             add chain inet {TABLE} postrouting {{ type nat hook postrouting priority srcnat; policy accept; }}\n\
             flush chain inet {TABLE} prerouting\n\
             flush chain inet {TABLE} input\n\
             flush chain inet {TABLE} forward\n\
             flush chain inet {TABLE} postrouting\n\
             table inet {TABLE} {{\n\
               chain prerouting {{\n\
             {pre}\
               }}\n\
               chain input {{\n\
                 iifname \"cmsite*\" ct state established,related accept\n\
             {input}\
                 iifname \"cmsite*\" drop\n\
               }}\n\
               chain forward {{\n\
                 oifname \"cmsite*\" ct state established,related accept\n\
                 oifname \"cmsite*\" drop\n\
                 iifname \"cmsite*\" ip saddr != @egress_sites drop\n\
             {dns}\
                 iifname \"cmsite*\" ip daddr {{ {NEVER} }} drop\n\
                 iifname \"cmsite*\" accept\n\
               }}\n\
               chain postrouting {{\n\
                 ip saddr {net} oifname != \"cmsite*\" masquerade\n\
               }}\n\
             }}\n"
        )
    }

    /// Installs the rules (once per process; they are the same for every
    /// site) and turns on forwarding, which egress needs.
    pub fn install(&self) -> std::io::Result<()> {
        static INSTALLED: Mutex<Option<String>> = Mutex::new(None);
        let ruleset = self.ruleset();
        let mut done = INSTALLED.lock().unwrap_or_else(|p| p.into_inner());
        if done.as_deref() == Some(ruleset.as_str()) {
            return Ok(());
        }
        run("nft", &["-f", "-"], Some(&ruleset))?;
        // Earlier versions let every data site reach every port in one
        // host-wide set, and named one PostgreSQL server in the rules; no
        // rule refers to those sets any more.
        for old in ["data_ports", "data_sites", "postgres_sites"] {
            let _ = run("nft", &["delete", "set", "inet", TABLE, old], None);
        }
        std::fs::write("/proc/sys/net/ipv4/ip_forward", "1")?;
        *done = Some(ruleset);
        Ok(())
    }
}

/// Joins the network namespace at `path` (the sandbox helper, before it
/// drops privileges).
pub fn enter(path: &std::path::Path) -> std::io::Result<()> {
    use std::os::unix::io::AsRawFd;
    let ns = std::fs::File::open(path)?;
    // SAFETY: setns on a descriptor we own, for the calling thread (the
    // helper is single-threaded here).
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sites_get_disjoint_links_in_the_block() {
        let a = SiteNet::of(0, DEFAULT_NETWORK).unwrap();
        let b = SiteNet::of(1, DEFAULT_NETWORK).unwrap();
        assert_eq!(a.host_ip, Ipv4Addr::new(10, 200, 0, 1));
        assert_eq!(a.site_ip, Ipv4Addr::new(10, 200, 0, 2));
        assert_eq!(b.host_ip, Ipv4Addr::new(10, 200, 0, 5));
        assert_eq!(a.netns, "commons-0");
        let last = SiteNet::of(DEFAULT_NETWORK.capacity() - 1, DEFAULT_NETWORK).unwrap();
        assert_eq!(last.site_ip, Ipv4Addr::new(10, 203, 255, 254));
        assert!(last.host_if.len() <= 15, "an interface name fits IFNAMSIZ");
        let biggest = "10.0.0.0/8".parse::<Network>().unwrap();
        let widest = SiteNet::of(biggest.capacity() - 1, biggest).unwrap();
        assert!(widest.host_if.len() <= 15, "{}", widest.host_if);
        let e = SiteNet::of(DEFAULT_NETWORK.capacity(), DEFAULT_NETWORK).unwrap_err();
        assert!(e.to_string().contains("[runtime] network"), "{e}");
    }

    #[test]
    fn the_registry_hands_out_the_lowest_free_index_and_finds_it_again() {
        let dir = std::env::temp_dir().join(format!("commons-registry-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let r = Registry::at(&dir).unwrap();
        let got: Vec<(u32, bool)> = ["/a#x", "/a#y", "/b#x"]
            .iter()
            .map(|k| r.index_for(k).unwrap())
            .collect();
        assert_eq!(got, [(0, true), (1, true), (2, true)]);
        assert_eq!(r.index_for("/a#y").unwrap(), (1, false), "allocated once");
        assert_eq!(r.free("/a#y").unwrap(), Some(1));
        assert_eq!(r.find("/a#y").1, None);
        assert_eq!(r.free("/a#y").unwrap(), None, "freeing twice is nothing");
        assert_eq!(
            r.index_for("/c#z").unwrap(),
            (1, true),
            "the freed index goes first"
        );
        assert_eq!(r.index_for("/c#w").unwrap(), (3, true));
        assert_eq!(r.find("/b#x").1, Some(2));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_network_is_a_private_aligned_block() {
        assert_eq!("10.200.0.0/14".parse::<Network>(), Ok(DEFAULT_NETWORK));
        for (bad, says) in [
            ("10.200.0.1/14", "start of a /14"),
            ("8.8.0.0/16", "private"),
            ("10.0.0.0/30", "8 to 28"),
            ("10.0.0.0", "10.200.0.0/14"),
        ] {
            let e = bad.parse::<Network>().unwrap_err();
            assert!(e.contains(says), "{bad}: {e}");
        }
    }

    #[test]
    fn the_ruleset_drops_everything_a_site_was_not_given() {
        let f = Firewall {
            network: DEFAULT_NETWORK,
            resolvers: vec![Ipv4Addr::new(10, 255, 255, 53)],
        };
        let r = f.ruleset();
        let r = r.lines().map(str::trim).collect::<Vec<_>>().join("\n");
        // Nothing from a site to the host but replies, and PostgreSQL and
        // the data API for those given each.
        assert!(r.contains("iifname \"cmsite*\" ct state established,related accept\niifname \"cmsite*\" meta l4proto tcp ct status dnat ct original proto-dst 5432 accept\niifname \"cmsite*\" meta l4proto tcp ct status dnat ct original proto-dst 8072 accept\niifname \"cmsite*\" drop"), "{r}");
        // Each site to its own platform's server and data API, by its address.
        assert!(r.contains("iifname \"cmsite*\" ip daddr 10.200.0.0/14 tcp dport 5432 dnat ip to ip saddr map @postgres_server"), "{r}");
        assert!(r.contains("iifname \"cmsite*\" ip daddr 10.200.0.0/14 tcp dport 8072 dnat ip to ip saddr map @data_api"), "{r}");
        assert!(!r.contains("data_ports"), "no host-wide set of ports: {r}");
        assert!(
            !r.contains("127.0.0.1"),
            "the rules name no platform's server, so processes of one host never undo each other's: {r}"
        );
        // Site to site: dropped before anything is let through.
        let forward = &r[r.find("chain forward").unwrap()..];
        let drop_to_sites = forward.find("oifname \"cmsite*\" drop").unwrap();
        let sealed = forward.find("ip saddr != @egress_sites drop").unwrap();
        let dns = forward.find("10.255.255.53 } udp dport 53 accept").unwrap();
        let never = forward.find("ip daddr { 0.0.0.0/8, 10.0.0.0/8").unwrap();
        let out = forward.find("iifname \"cmsite*\" accept").unwrap();
        assert!(drop_to_sites < sealed, "{forward}");
        assert!(sealed < dns && dns < never && never < out, "{forward}");
    }
}
