//! The fleet: limits and blocks shared through Redis (docs/fleet.md).

use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};

use mxguard_policy::Limited;

use crate::admission::AdmissionMetrics;
use crate::admission_config::Admission;

pub struct Cluster {
    up: AtomicBool,
}

impl Cluster {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The fleet's decision, or `None` to decide locally.
    pub async fn admit(
        &self,
        _ip: IpAddr,
        _config: &Admission,
        _metrics: &AdmissionMetrics,
    ) -> Option<Option<Limited>> {
        None
    }
}
