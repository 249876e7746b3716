//! `intercept.mode = "sk_lookup"`: the guard's own BPF program
//! ([`mxguard_net::Steer`]) hands new connections for `sk_lookup.ports`
//! to the guard's listeners, with no NAT and no connection tracking; the
//! accepted socket's local address is where the client was going.
//!
//! With `sk_lookup.bypass_passed` the program has a copy of the pass
//! cache: a client that passed is added with the pass's TTL, and its new
//! connections are left to the kernel's own lookup, which finds the MTA
//! listening on the port (postscreen's hand-off, done by the kernel). A
//! block of the address (a detection, the admin API, the fleet, a list
//! file) takes it out at once, so its next connection meets the guard
//! again. The copy is the guard's: it goes with the guard, as the
//! program does.

use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, OnceLock, Weak};
use std::time::Duration;

use anyhow::Context;
use ipnet::IpNet;
use mxguard_net::{Steer, SteerConfig};
use prometheus::IntCounterVec;

use crate::config::Config;
use crate::lists::{DynamicRecord, ListKind, ListSink};
use crate::server::{KernelPasses, Shared};

/// Loads and attaches the program, steering to the first listener of each
/// family (the kernel picks within its `SO_REUSEPORT` group). Before the
/// daemon's shared state exists: see [`start`].
pub fn attach(config: &Config, listeners: &[std::net::TcpListener]) -> anyhow::Result<Steer> {
    let settings = &config.sk_lookup;
    let interfaces = settings
        .interfaces
        .iter()
        .map(|name| {
            mxguard_net::steer::ifindex(name)
                .with_context(|| format!("sk_lookup.interfaces: no interface {name:?}"))
        })
        .collect::<anyhow::Result<Vec<u32>>>()?;
    let family = |v6: bool| {
        listeners
            .iter()
            .find(|l| l.local_addr().is_ok_and(|a| a.is_ipv6() == v6))
    };
    let (v4, v6) = (family(false), family(true));
    for (missing, name) in [(v4.is_none(), "IPv4"), (v6.is_none(), "IPv6")] {
        if missing {
            tracing::warn!(
                "sk_lookup: no {name} address in intercept.listen: {name} connections are not steered and reach the MTA unguarded"
            );
        }
    }
    let steer = Steer::attach(
        &SteerConfig {
            ports: settings.ports.clone(),
            interfaces,
            passes: if settings.bypass_passed {
                settings.bypass_entries
            } else {
                0
            },
        },
        v4,
        v6,
    )
    .context("intercept.mode = \"sk_lookup\"")?;
    let to: Vec<SocketAddr> = [v4, v6]
        .into_iter()
        .flatten()
        .filter_map(|l| l.local_addr().ok())
        .collect();
    tracing::info!(
        "sk_lookup: new connections to ports {:?}{} steered to {}{}",
        settings.ports,
        if settings.interfaces.is_empty() {
            String::new()
        } else {
            format!(" on {}", settings.interfaces.join(", "))
        },
        to.iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(", "),
        if settings.bypass_passed {
            ", except from clients with a pass"
        } else {
            ""
        }
    );
    Ok(steer)
}

/// The attached program, fed with the passes and blocks.
pub struct SkLookup {
    steer: Steer,
    shared: OnceLock<Weak<Shared>>,
    /// `mxguard_sk_lookup_passed_total{op, result}`.
    counts: IntCounterVec,
}

/// Keeps the program for the daemon's life; with the bypass, the pass
/// cache and the lists feed its map.
pub fn start(shared: &Arc<Shared>, steer: Steer) {
    let bypass = steer.bypasses();
    let sk = Arc::new(SkLookup {
        steer,
        shared: OnceLock::new(),
        counts: shared.admission.metrics.sk_lookup_passed.clone(),
    });
    let _ = sk.shared.set(Arc::downgrade(shared));
    if bypass {
        let _ = shared.kernel_bypass.set(sk.clone());
        shared.lists.add_sink(sk.clone());
    }
    let _ = shared.sk_lookup.set(sk);
}

impl SkLookup {
    fn shared(&self) -> Option<Arc<Shared>> {
        self.shared.get().and_then(Weak::upgrade)
    }

    fn count(&self, op: &str, ip: IpAddr, result: std::io::Result<()>) {
        let status = if result.is_ok() { "ok" } else { "error" };
        self.counts.with_label_values(&[op, status]).inc();
        if let Err(e) = result {
            tracing::warn!("sk_lookup: cannot {op} {ip} in the passed map: {e}");
        }
    }

    /// Out of the pass cache and the program's map.
    fn forget(&self, shared: &Shared, net: IpNet) {
        for ip in shared.forget_passes(net) {
            let result = self.steer.unpass(ip);
            self.count("remove", ip, result);
        }
    }
}

impl KernelPasses for SkLookup {
    fn passed(&self, ip: IpAddr, ttl: Duration) {
        if ttl.is_zero() {
            return;
        }
        let result = self.steer.pass(ip, ttl);
        self.count("add", ip, result);
        // Written first, checked after: a block published before this
        // check is seen here, one published after it takes the entry out
        // itself (`published`), so a pass never outlives a block.
        if let Some(shared) = self.shared() {
            if shared.blocked_now(ip) {
                shared.forget_passes(IpNet::from(ip));
                let result = self.steer.unpass(ip);
                self.count("remove", ip, result);
            }
        }
    }
}

impl ListSink for SkLookup {
    fn added(&self, _record: &DynamicRecord, _sync: bool) -> Result<(), String> {
        Ok(())
    }

    /// A block is in the lists: its passes go, those of the pass cache and,
    /// for one address, the map's own whether the cache still had it or not.
    fn published(&self, record: &DynamicRecord) {
        if record.kind != ListKind::Block {
            return;
        }
        let Some(shared) = self.shared() else {
            return;
        };
        let mut gone: Vec<IpAddr> = shared
            .forget_passes(record.net)
            .into_iter()
            .map(mxguard_policy::canonical_ip)
            .collect();
        let net = mxguard_policy::canonical_net(record.net);
        if net.prefix_len() == net.max_prefix_len() {
            gone.push(net.addr());
        }
        gone.sort_unstable();
        gone.dedup();
        for ip in gone {
            let result = self.steer.unpass(ip);
            self.count("remove", ip, result);
        }
    }

    fn removed(&self, _kind: ListKind, _net: IpNet) -> Result<(), String> {
        Ok(())
    }

    /// The list files were read again: a pass a file now blocks goes.
    fn files_loaded(&self) {
        let Some(shared) = self.shared() else {
            return;
        };
        for (ip, _) in shared.passes() {
            if shared.blocked_now(ip) {
                self.forget(&shared, IpNet::from(ip));
            }
        }
    }
}
