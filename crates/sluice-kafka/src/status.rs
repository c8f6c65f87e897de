//! A stage's live state, shared with the health endpoints.

use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::latency::ControllerState;
use crate::progress::Stalled;

/// Read by `/readyz` and `/status`; written by the runtime and the stage.
#[derive(Debug, Default)]
pub struct StageStatus {
    /// The stage finished its warm-up (the inferrer: the model ran a full batch).
    warmed_up: AtomicBool,
    /// Partitions of the input topic currently assigned to this member.
    assigned_partitions: AtomicI64,
    /// Whether the group join completed at least once.
    joined: AtomicBool,
    /// Inputs whose outputs were all acknowledged and whose offsets were stored.
    pub acknowledged: AtomicU64,
    /// Assigned partitions with work waiting and no progress for
    /// `runtime.stall_after_ms` (`crate::progress`).
    stalled: Mutex<Vec<Stalled>>,
    /// The latency controller's state, while it is on.
    controller: Mutex<Option<ControllerState>>,
    /// With lanes: whether the bulk partitions are paused now, and how often they were.
    bulk_paused: AtomicBool,
    bulk_pauses: AtomicU64,
}

impl StageStatus {
    pub fn set_warmed_up(&self) {
        self.warmed_up.store(true, Ordering::Release);
    }

    pub fn warmed_up(&self) -> bool {
        self.warmed_up.load(Ordering::Acquire)
    }

    pub(crate) fn set_assigned(&self, partitions: i64) {
        self.assigned_partitions.store(partitions, Ordering::Release);
        self.joined.store(true, Ordering::Release);
    }

    pub fn assigned_partitions(&self) -> i64 {
        self.assigned_partitions.load(Ordering::Acquire)
    }

    /// The partitions stalled at the last look (none: every one moves or has no lag).
    pub fn stalled(&self) -> Vec<Stalled> {
        self.stalled.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_stalled(&self, stalled: Vec<Stalled>) {
        *self.stalled.lock().unwrap_or_else(PoisonError::into_inner) = stalled;
    }

    /// The latency controller's target, policy and last change (none: off).
    pub fn controller(&self) -> Option<ControllerState> {
        self.controller.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    pub(crate) fn set_controller(&self, state: Option<ControllerState>) {
        *self.controller.lock().unwrap_or_else(PoisonError::into_inner) = state;
    }

    /// Whether the bulk partitions are paused now (their queue is full).
    pub fn bulk_paused(&self) -> bool {
        self.bulk_paused.load(Ordering::Acquire)
    }

    /// How many times the bulk partitions were paused.
    pub fn bulk_pauses(&self) -> u64 {
        self.bulk_pauses.load(Ordering::Acquire)
    }

    pub(crate) fn set_bulk_paused(&self, paused: bool) {
        if paused {
            self.bulk_pauses.fetch_add(1, Ordering::AcqRel);
        }
        self.bulk_paused.store(paused, Ordering::Release);
    }

    /// Ready to serve: warmed up and a member of its consumer group. A member
    /// with zero partitions is still ready (more replicas than partitions).
    pub fn ready(&self) -> bool {
        self.warmed_up() && self.joined.load(Ordering::Acquire)
    }
}
