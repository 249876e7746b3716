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

use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;
use parking_lot::Mutex;

use crate::admission::AdmissionMetrics;
use crate::admission_config::Nftables;
use crate::lists::{DynamicRecord, ListKind, ListSink};
use crate::server::Shared;

/// An address to add, with its timeout (None: no expiry).
type Element = (IpAddr, Option<u64>);

pub struct Nft {
    nft: PathBuf,
    table: String,
    queue: Mutex<Vec<Element>>,
    removals: Mutex<Vec<IpAddr>>,
    wake: tokio::sync::Notify,
    metrics: AdmissionMetrics,
}

impl Nft {
    pub fn new(config: &Nftables, metrics: AdmissionMetrics) -> Self {
        Self {
            nft: config.nft.clone(),
            table: config.table.clone(),
            queue: Mutex::new(Vec::new()),
            removals: Mutex::new(Vec::new()),
            wake: tokio::sync::Notify::new(),
            metrics,
        }
    }

    /// The ruleset of a table the guard owns.
    pub fn table_script(config: &Nftables) -> String {
        let t = &config.table;
        let ports = config
            .ports
            .iter()
            .map(u16::to_string)
            .collect::<Vec<_>>()
            .join(", ");
        format!(
            "add table inet {t}\n\
             delete table inet {t}\n\
             table inet {t} {{\n\
             \tset blocked4 {{ type ipv4_addr; flags timeout; }}\n\
             \tset blocked6 {{ type ipv6_addr; flags timeout; }}\n\
             \tchain input {{\n\
             \t\ttype filter hook input priority -10; policy accept;\n\
             \t\tip saddr @blocked4 tcp dport {{ {ports} }} drop\n\
             \t\tip6 saddr @blocked6 tcp dport {{ {ports} }} drop\n\
             \t}}\n\
             }}\n"
        )
    }

    /// The `nft` commands adding `elements`.
    fn add_script(&self, elements: &[Element]) -> String {
        let mut out = String::new();
        for (set, v6) in [("blocked4", false), ("blocked6", true)] {
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
                    "add element inet {} {set} {{ {} }}\n",
                    self.table,
                    items.join(", ")
                ));
            }
        }
        out
    }

    async fn run(&self, script: String) -> Result<(), String> {
        use tokio::io::AsyncWriteExt;
        let mut child = tokio::process::Command::new(&self.nft)
            .args(["-f", "-"])
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .map_err(|e| format!("{}: {e}", self.nft.display()))?;
        if let Some(mut stdin) = child.stdin.take() {
            stdin
                .write_all(script.as_bytes())
                .await
                .map_err(|e| e.to_string())?;
        }
        let out = tokio::time::timeout(Duration::from_secs(10), child.wait_with_output())
            .await
            .map_err(|_| "nft did not finish within 10s".to_string())?
            .map_err(|e| e.to_string())?;
        if out.status.success() {
            Ok(())
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_string())
        }
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

/// The address of a whole-address prefix.
fn host(net: IpNet) -> Option<IpAddr> {
    let net = mxguard_policy::canonical_net(net);
    (net.prefix_len() == net.max_prefix_len()).then(|| net.addr())
}

impl ListSink for Nft {
    fn added(&self, record: &DynamicRecord, _sync: bool) -> Result<(), String> {
        if record.kind == ListKind::Block {
            self.push(record);
        }
        Ok(())
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
    let nft = Arc::new(Nft::new(config, shared.admission.metrics.clone()));
    if config.create {
        nft.run(Nft::table_script(config)).await.map_err(|e| {
            anyhow::anyhow!("nftables: cannot create table inet {}: {e}", config.table)
        })?;
        tracing::info!(
            "nftables: table inet {} with sets blocked4, blocked6 dropping ports {:?}",
            config.table,
            config.ports
        );
    }
    for record in shared.lists.dynamic_records() {
        if record.kind == ListKind::Block {
            nft.push(&record);
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
            .filter(|(ip, _)| shared.listed(*ip) == Some(ListKind::Block))
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
        let table = Nft::table_script(&config);
        assert!(
            table.contains("ip saddr @blocked4 tcp dport { 25 } drop"),
            "{table}"
        );
        assert_eq!(host("192.0.2.0/24".parse().unwrap()), None);
        assert_eq!(
            host("::ffff:192.0.2.9/128".parse().unwrap()),
            Some("192.0.2.9".parse().unwrap())
        );
    }
}
