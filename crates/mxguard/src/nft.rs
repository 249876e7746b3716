//! Kernel offload (`[nftables]`, off by default): blocked addresses go
//! into nftables sets with a timeout, so the kernel drops their SYNs and
//! a blocked bot costs the guard nothing at all.
//!
//! Through the `nft` binary, batched: additions are collected for
//! `batch_interval` (200 ms) and written in one `nft -f -` transaction,
//! so a flood of detections is a few processes a second, not one per
//! address. The sets carry the same expiry as the blocklist entry; the
//! kernel forgets them by itself. Only whole addresses (/32, /128) are
//! pushed: prefixes stay the guard's (an interval set with timeouts would
//! cover them, at the price of merging rules nft applies to overlapping
//! intervals). An address an allow entry covers is never pushed, whatever
//! blocked it.
//!
//! With `create = true` the guard owns the table `inet <table>`: at start
//! it is replaced by one holding the sets `blocked4` and `blocked6` and an
//! input chain dropping their members' packets to `ports`. Every live
//! block is pushed again at start (the kernel sets do not survive a
//! reboot; the state store does).
//!
//! With `redirect = true` the table holds the interception instead of the
//! input chain: one nat chain that drops blocked addresses' new
//! connections to `ports` (by the port they asked for: after REDIRECT the
//! port is the guard's), then redirects those that come in on
//! `redirect_interfaces` to the guard's listen port. A nat chain sees only
//! a connection's first packet, so the established ones, guarded or
//! bypassed, pay for no rule at all (filter chains in prerouting and input
//! cost ~10 µs per small SMTP session here, `bench/analysis.md`). The
//! guard must own the redirect for the bypass: an `accept` in one nat
//! chain ends that chain only, and another table's REDIRECT at the same
//! hook still takes the connection.
//!
//! With `bypass_passed = true` the pass cache has a kernel copy, the sets
//! `passed4`/`passed6`: a client that passed is added with the pass's TTL
//! and its new connections skip the redirect, straight to the MTA without
//! the guard (postscreen's hand-off, done by the kernel). A block of the
//! address (a detection, the admin API, the fleet, a list file) takes it
//! out of the set and of the pass cache, so its next connection meets the
//! guard again. At start, what the old table's passed sets still held is
//! read back (the pass cache does not survive a restart; the kernel's copy
//! does) and pushed into the new table.

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;

use crate::admission::AdmissionMetrics;
use crate::admission_config::Nftables;
use crate::lists::{DynamicRecord, ListKind, ListSink};
use crate::server::{KernelPasses, Shared};

/// An address to add, with its timeout (None: no expiry).
type Element = (IpAddr, Option<u64>);

/// The sets of blocked addresses, and of passed ones (IPv4, IPv6).
const BLOCKED: [&str; 2] = ["blocked4", "blocked6"];
const PASSED: [&str; 2] = ["passed4", "passed6"];

pub struct Nft {
    nft: PathBuf,
    table: String,
    queue: Mutex<Vec<Element>>,
    removals: Mutex<Vec<IpAddr>>,
    /// `bypass_passed`: the kernel keeps a copy of the pass cache.
    bypass: bool,
    /// Passes to add to the passed sets.
    passes: Mutex<Vec<Element>>,
    /// Addresses to take out of the passed sets (blocked since).
    unpasses: Mutex<Vec<IpAddr>>,
    /// The list files were read again: check every pass against them.
    sweep: AtomicBool,
    /// Whose pass cache this mirrors (weak: `Shared` holds us).
    shared: Weak<Shared>,
    wake: tokio::sync::Notify,
    metrics: AdmissionMetrics,
}

impl Nft {
    pub fn new(config: &Nftables, metrics: AdmissionMetrics, shared: Weak<Shared>) -> Self {
        Self {
            nft: config.nft.clone(),
            table: config.table.clone(),
            queue: Mutex::new(Vec::new()),
            removals: Mutex::new(Vec::new()),
            bypass: config.bypass_passed,
            passes: Mutex::new(Vec::new()),
            unpasses: Mutex::new(Vec::new()),
            sweep: AtomicBool::new(false),
            shared,
            wake: tokio::sync::Notify::new(),
            metrics,
        }
    }

    /// The ruleset of a table the guard owns. `guard_port`: where
    /// `redirect` sends connections (the guard's listen port).
    pub fn table_script(config: &Nftables, guard_port: Option<u16>) -> String {
        let t = &config.table;
        let ports = config
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        let mut out = format!(
            "add table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tset blocked4 {{ type ipv4_addr; flags timeout; }}\n\
             \tset blocked6 {{ type ipv6_addr; flags timeout; }}\n"
        );
        if config.bypass_passed {
            out.push_str(
                "\tset passed4 { type ipv4_addr; flags timeout; }\n\
                 \tset passed6 { type ipv6_addr; flags timeout; }\n",
            );
        }
        let drops = format!(
            "\t\tip saddr @blocked4 tcp dport {{ {ports} }} drop\n\
             \t\tip6 saddr @blocked6 tcp dport {{ {ports} }} drop\n"
        );
        match (config.redirect, guard_port) {
            (true, Some(guard_port)) => {
                let ifs = config
                    .redirect_interfaces
                    .iter()
                    .map(|i| format!("\"{i}\""))
                    .collect::<Vec<_>>()
                    .join(", ");
                // The drops first, on every interface, before the bypass
                // and the redirect: a blocked client's SYN goes no further.
                out.push_str(&format!(
                    "\tchain intercept {{\n\
                     \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
                     {drops}"
                ));
                if config.bypass_passed {
                    out.push_str(&format!(
                        "\t\tiifname {{ {ifs} }} ip saddr @passed4 tcp dport {{ {ports} }} accept\n\
                         \t\tiifname {{ {ifs} }} ip6 saddr @passed6 tcp dport {{ {ports} }} accept\n"
                    ));
                }
                out.push_str(&format!(
                    "\t\tiifname {{ {ifs} }} tcp dport {{ {ports} }} redirect to :{guard_port}\n\
                     \t}}\n"
                ));
            }
            _ => out.push_str(&format!(
                "\tchain input {{\n\
                 \t\ttype filter hook input priority -10; policy accept;\n\
                 {drops}\
                 \t}}\n"
            )),
        }
        out.push_str("}\n");
        out
    }

    /// The `nft` commands adding `elements` to the blocked sets.
    fn add_script(&self, elements: &[Element]) -> String {
        add_elements(&self.table, BLOCKED, elements)
    }

    /// Runs `nft -f -` with `script` on its standard input.
    async fn run(&self, script: String) -> Result<(), String> {
        self.nft_output(&["-f", "-"], Some(script)).await.map(drop)
    }

    /// Runs `nft ARGS`; its standard output.
    async fn nft_output(&self, args: &[&str], stdin: Option<String>) -> Result<Vec<u8>, String> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.nft)
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.nft.display()))?;
        if let Some(mut stdin_pipe) = child.stdin.take() {
            if let Some(script) = stdin {
                stdin_pipe
                    .write_all(script.as_bytes())
                    .await
                    .map_err(|e| e.to_string())?;
            }
        }
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .map_err(|_| "nft did not finish within 10s".to_string())?
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(out.stdout)
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
    }

    /// A client passed: into the kernel's copy of the pass cache for `ttl`.
    pub fn passed(&self, ip: IpAddr, ttl: Duration) {
        if !self.bypass || ttl.is_zero() {
            return;
        }
        let ip = mxguard_policy::canonical_ip(ip);
        let ms = u64::try_from(ttl.as_millis()).unwrap_or(u64::MAX);
        self.passes.lock().push((ip, Some(ms)));
        self.wake.notify_one();
    }

    /// What the passed sets of the table as it is now still hold: (address,
    /// time left). Nothing when there is no such table yet.
    async fn read_passed(&self) -> Vec<(IpAddr, Duration)> {
        let mut out = Vec::new();
        for set in PASSED {
            let args = ["-j", "list", "set", "inet", &self.table, set];
            if let Ok(json) = self.nft_output(&args, None).await {
                out.extend(set_elements(&String::from_utf8_lossy(&json)));
            }
        }
        out
    }

    /// Pushes the passes collected since the last batch and takes out the
    /// addresses blocked since they passed.
    async fn sync_passes(&self, shared: &Shared) {
        if self.sweep.swap(false, Ordering::AcqRel) {
            // The list files were read again: a pass a file now blocks
            // leaves the kernel too.
            let blocked: Vec<IpAddr> = shared
                .passes()
                .into_iter()
                .map(|(ip, _)| ip)
                .filter(|ip| shared.blocked_now(*ip))
                .collect();
            for ip in blocked {
                self.forget(shared, ip);
            }
        }
        // One element per address (the longest timeout): nft refuses an
        // element twice in one command.
        let mut adds: HashMap<IpAddr, Option<u64>> = HashMap::new();
        for (ip, ms) in std::mem::take(&mut *self.passes.lock()) {
            // A session that passed while a concurrent one got the
            // address blocked.
            if shared.blocked_now(ip) {
                self.forget(shared, ip);
                continue;
            }
            let longest = adds.entry(ip).or_insert(ms);
            *longest = (*longest).max(ms);
        }
        if !adds.is_empty() {
            let adds: Vec<Element> = adds.into_iter().collect();
            let n = adds.len() as u64;
            let result = self.run(add_elements(&self.table, PASSED, &adds)).await;
            self.count_passed("add", n, result);
        }
        // After the additions: a pass and a block of the same address in
        // one batch end with the address out.
        let mut removals = std::mem::take(&mut *self.unpasses.lock());
        removals.sort_unstable();
        removals.dedup();
        if !removals.is_empty() {
            let n = removals.len() as u64;
            let result = self
                .run(remove_elements(&self.table, PASSED, &removals))
                .await;
            self.count_passed("remove", n, result);
        }
    }

    fn count_passed(&self, op: &str, n: u64, result: Result<(), String>) {
        let status = if result.is_ok() { "ok" } else { "error" };
        self.metrics
            .nft_passed
            .with_label_values(&[op, status])
            .inc_by(n);
        match result {
            Ok(()) => tracing::debug!("nftables: {op} {n} passed address(es)"),
            Err(e) => tracing::warn!("nftables: cannot {op} {n} passed address(es): {e}"),
        }
    }

    /// Out of the pass cache and (at the next batch) the passed sets.
    fn forget(&self, shared: &Shared, ip: IpAddr) {
        let gone = shared.forget_passes(IpNet::from(ip));
        self.unpasses
            .lock()
            .extend(gone.into_iter().map(mxguard_policy::canonical_ip));
    }

    fn push(&self, record: &DynamicRecord) {
        let Some(ip) = host(record.net) else {
            return;
        };
        let now = crate::lists::millis(crate::lists::unix_now());
        let timeout = match record.until_unix_ms {
            Some(until) if until <= now => return,
            Some(until) => Some(until - now),
            None => None,
        };
        self.queue.lock().push((ip, timeout));
        self.wake.notify_one();
    }
}

/// The `nft` commands adding `elements` to `sets` (IPv4, IPv6).
fn add_elements(table: &str, sets: [&str; 2], elements: &[Element]) -> String {
    let mut out = String::new();
    for (set, v6) in sets.into_iter().zip([false, true]) {
        let items: Vec<String> = elements
            .iter()
            .filter(|(ip, _)| ip.is_ipv6() == v6)
            .map(|(ip, ms)| match ms {
                Some(ms) => format!("{ip} timeout {}ms", (*ms).max(1000)),
                None => ip.to_string(),
            })
            .collect();
        if !items.is_empty() {
            out.push_str(&format!(
                "add element inet {table} {set} {{ {} }}\n",
                items.join(", ")
            ));
        }
    }
    out
}

/// The `nft` commands removing `addrs` from `sets`, whether or not they
/// are there: adding an element that is there changes nothing, so each
/// is added, then deleted, in one transaction (a plain delete of an
/// element the kernel has already expired fails the whole batch; nft's
/// `destroy` needs nft 1.0.8 and Linux 6.3).
fn remove_elements(table: &str, sets: [&str; 2], addrs: &[IpAddr]) -> String {
    let mut out = String::new();
    for (set, v6) in sets.into_iter().zip([false, true]) {
        let items: Vec<String> = addrs
            .iter()
            .filter(|ip| ip.is_ipv6() == v6)
            .map(ToString::to_string)
            .collect();
        if !items.is_empty() {
            let items = items.join(", ");
            out.push_str(&format!(
                "add element inet {table} {set} {{ {items} }}\n\
                 delete element inet {table} {set} {{ {items} }}\n"
            ));
        }
    }
    out
}

/// The elements of `nft -j list set` that expire: (address, time left).
fn set_elements(json: &str) -> Vec<(IpAddr, Duration)> {
    let Ok(doc) = serde_json::from_str::<serde_json::Value>(json) else {
        return Vec::new();
    };
    let items = doc["nftables"].as_array().map_or(&[][..], Vec::as_slice);
    items
        .iter()
        .filter_map(|item| item["set"]["elem"].as_array())
        .flatten()
        .filter_map(|e| {
            let ip = e["elem"]["val"].as_str()?.parse().ok()?;
            let left = e["elem"]["expires"].as_u64().filter(|s| *s > 0)?;
            Some((ip, Duration::from_secs(left)))
        })
        .collect()
}

/// The address of a whole-address prefix.
fn host(net: IpNet) -> Option<IpAddr> {
    let net = mxguard_policy::canonical_net(net);
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

impl KernelPasses for Nft {
    fn passed(&self, ip: IpAddr, ttl: Duration) {
        Nft::passed(self, ip, ttl);
    }
}

impl ListSink for Nft {
    fn added(&self, record: &DynamicRecord, _sync: bool) -> Result<(), String> {
        if record.kind == ListKind::Block {
            self.push(record);
            if let Some(shared) = self.shared.upgrade().filter(|_| self.bypass) {
                let gone = shared.forget_passes(record.net);
                if !gone.is_empty() {
                    self.unpasses
                        .lock()
                        .extend(gone.into_iter().map(mxguard_policy::canonical_ip));
                    self.wake.notify_one();
                }
            }
        }
        Ok(())
    }

    fn files_loaded(&self) {
        if self.bypass {
            self.sweep.store(true, Ordering::Release);
            self.wake.notify_one();
        }
    }

    fn removed(&self, kind: ListKind, net: IpNet) -> Result<(), String> {
        if let (ListKind::Block, Some(ip)) = (kind, host(net)) {
            self.removals.lock().push(ip);
            self.wake.notify_one();
        }
        Ok(())
    }
}

/// Sets up the table (with `create`), pushes every live block, and starts
/// the batching task.
pub async fn start(shared: &Arc<Shared>, config: &Nftables) -> anyhow::Result<()> {
    let nft = Arc::new(Nft::new(
        config,
        shared.admission.metrics.clone(),
        Arc::downgrade(shared),
    ));
    // Before the table is replaced: the passes its sets still hold.
    let carried = if config.bypass_passed {
        nft.read_passed().await
    } else {
        Vec::new()
    };
    if config.create {
        // `validate` has checked that every listener has this port.
        let guard_port = shared.listen_addrs.first().map(std::net::SocketAddr::port);
        nft.run(Nft::table_script(config, guard_port))
            .await
            .map_err(|e| {
                anyhow::anyhow!("nftables: cannot create table inet {}: {e}", config.table)
            })?;
        tracing::info!(
            "nftables: table inet {} with sets blocked4, blocked6 dropping ports {:?}",
            config.table,
            config.ports
        );
        if let (true, Some(port)) = (config.redirect, guard_port) {
            tracing::info!(
                "nftables: new connections to ports {:?} on {} redirected to port {port}{}",
                config.ports,
                config.redirect_interfaces.join(", "),
                if config.bypass_passed {
                    ", except from the addresses in passed4, passed6"
                } else {
                    ""
                }
            );
        }
    }
    for record in shared.lists.dynamic_records() {
        if record.kind == ListKind::Block {
            nft.push(&record);
        }
    }
    if config.bypass_passed {
        let _ = shared
            .kernel_bypass
            .set(nft.clone() as Arc<dyn KernelPasses>);
        let n = carried.len();
        for (ip, left) in carried {
            // Into the pass cache, and back into the new sets (unless
            // blocked since).
            shared.remember_pass(ip, left);
        }
        if n > 0 {
            tracing::info!("nftables: {n} passed address(es) carried over from the old table");
        }
    }
    shared.lists.add_sink(nft.clone());
    tokio::spawn(batch_loop(shared.clone(), nft, config.batch_interval.0));
    Ok(())
}

async fn batch_loop(shared: Arc<Shared>, nft: Arc<Nft>, every: Duration) {
    loop {
        nft.wake.notified().await;
        tokio::time::sleep(every).await;
        let batch: Vec<Element> = std::mem::take(&mut *nft.queue.lock())
            .into_iter()
            // A block that an allow entry overrides stays out of the kernel.
            .filter(|(ip, _)| shared.blocked_now(*ip))
            .collect();
        if !batch.is_empty() {
            let n = batch.len() as u64;
            match nft.run(nft.add_script(&batch)).await {
                Ok(()) => {
                    nft.metrics.nft.with_label_values(&["ok"]).inc_by(n);
                    tracing::debug!("nftables: {n} address(es) added");
                }
                Err(e) => {
                    nft.metrics.nft.with_label_values(&["error"]).inc_by(n);
                    tracing::warn!("nftables: cannot add {n} address(es): {e}");
                }
            }
        }
        let removals = std::mem::take(&mut *nft.removals.lock());
        for ip in removals {
            let set = if ip.is_ipv6() { "blocked6" } else { "blocked4" };
            // One by one: deleting an element the kernel already expired
            // fails, and must not take the others with it.
            let _ = nft
                .run(format!(
                    "delete element inet {} {set} {{ {ip} }}\n",
                    nft.table
                ))
                .await;
        }
        if nft.bypass {
            nft.sync_passes(&shared).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_by_family_with_timeouts() {
        let config = Nftables::default();
        let nft = Nft::new(
            &config,
            AdmissionMetrics::new(&crate::metrics::Metrics::new().unwrap()).unwrap(),
            Weak::new(),
        );
        let script = nft.add_script(&[
            ("192.0.2.1".parse().unwrap(), Some(3_600_000)),
            ("2001:db8::1".parse().unwrap(), None),
            ("192.0.2.2".parse().unwrap(), Some(10)),
        ]);
        assert_eq!(
            script,
            "add element inet mxguard blocked4 { 192.0.2.1 timeout 3600000ms, 192.0.2.2 timeout 1000ms }\n\
             add element inet mxguard blocked6 { 2001:db8::1 }\n"
        );
        let table = Nft::table_script(&config, Some(10025));
        assert_eq!(
            table,
            "add table inet mxguard\n\
             delete table inet mxguard\n\
             table inet mxguard {\n\
             \tset blocked4 { type ipv4_addr; flags timeout; }\n\
             \tset blocked6 { type ipv6_addr; flags timeout; }\n\
             \tchain input {\n\
             \t\ttype filter hook input priority -10; policy accept;\n\
             \t\tip saddr @blocked4 tcp dport { 25 } drop\n\
             \t\tip6 saddr @blocked6 tcp dport { 25 } drop\n\
             \t}\n\
             }\n"
        );
        assert!(
            !table.contains("passed") && !table.contains("redirect"),
            "{table}"
        );
        assert_eq!(host("192.0.2.0/24".parse().unwrap()), None);
        assert_eq!(
            host("::ffff:192.0.2.9/128".parse().unwrap()),
            Some("192.0.2.9".parse().unwrap())
        );
    }

    #[test]
    fn the_guard_owns_the_redirect_and_passed_clients_skip_it() {
        let config = Nftables {
            redirect: true,
            redirect_interfaces: vec!["eth0".into(), "wan*".into()],
            bypass_passed: true,
            ports: vec![25, 587],
            ..Nftables::default()
        };
        assert_eq!(
            Nft::table_script(&config, Some(10025)),
            "add table inet mxguard\n\
             delete table inet mxguard\n\
             table inet mxguard {\n\
             \tset blocked4 { type ipv4_addr; flags timeout; }\n\
             \tset blocked6 { type ipv6_addr; flags timeout; }\n\
             \tset passed4 { type ipv4_addr; flags timeout; }\n\
             \tset passed6 { type ipv6_addr; flags timeout; }\n\
             \tchain intercept {\n\
             \t\ttype nat hook prerouting priority dstnat; policy accept;\n\
             \t\tip saddr @blocked4 tcp dport { 25, 587 } drop\n\
             \t\tip6 saddr @blocked6 tcp dport { 25, 587 } drop\n\
             \t\tiifname { \"eth0\", \"wan*\" } ip saddr @passed4 tcp dport { 25, 587 } accept\n\
             \t\tiifname { \"eth0\", \"wan*\" } ip6 saddr @passed6 tcp dport { 25, 587 } accept\n\
             \t\tiifname { \"eth0\", \"wan*\" } tcp dport { 25, 587 } redirect to :10025\n\
             \t}\n\
             }\n"
        );
        // The redirect without the bypass: no passed sets, no accept.
        let plain = Nft::table_script(
            &Nftables {
                bypass_passed: false,
                ..config
            },
            Some(10025),
        );
        assert!(
            !plain.contains("passed") && !plain.contains("accept\n"),
            "{plain}"
        );
        assert!(!plain.contains("chain input"), "{plain}");
        assert!(
            plain.contains("tcp dport { 25, 587 } redirect to :10025"),
            "{plain}"
        );
    }

    #[test]
    fn passes_are_added_with_their_ttl_and_removed_whether_or_not_there() {
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        assert_eq!(
            add_elements(
                "mxguard",
                PASSED,
                &[(a, Some(86_400_000)), (b, Some(5_000))]
            ),
            "add element inet mxguard passed4 { 192.0.2.1 timeout 86400000ms }\n\
             add element inet mxguard passed6 { 2001:db8::1 timeout 5000ms }\n"
        );
        assert_eq!(
            remove_elements("mxguard", PASSED, &[a, b]),
            "add element inet mxguard passed4 { 192.0.2.1 }\n\
             delete element inet mxguard passed4 { 192.0.2.1 }\n\
             add element inet mxguard passed6 { 2001:db8::1 }\n\
             delete element inet mxguard passed6 { 2001:db8::1 }\n"
        );
        assert_eq!(remove_elements("mxguard", PASSED, &[]), "");
    }

    #[test]
    fn the_old_tables_passes_are_read_back_with_the_time_they_have_left() {
        // `nft -j list set inet mxguard passed4` (nft 1.0.6).
        let json = r#"{"nftables": [{"metainfo": {"version": "1.0.6", "json_schema_version": 1}},
            {"set": {"family": "inet", "name": "passed4", "table": "mxguard", "type": "ipv4_addr",
             "handle": 1, "flags": ["timeout"], "elem": [
               {"elem": {"val": "10.1.2.3", "timeout": 86400, "expires": 86399}},
               {"elem": {"val": "10.1.2.4", "timeout": 5, "expires": 0}},
               "10.1.2.5"]}}]}"#;
        assert_eq!(
            set_elements(json),
            vec![("10.1.2.3".parse().unwrap(), Duration::from_secs(86399))]
        );
        assert!(set_elements("").is_empty());
        assert!(set_elements(r#"{"nftables": [{"set": {"name": "passed4"}}]}"#).is_empty());
    }
}
