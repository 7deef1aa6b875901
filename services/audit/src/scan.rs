//! Port-scan detection over the decision stream, as a pure fold.
//!
//! A source (cluster and address) whose anomalous connections (alert,
//! prevent, block) reach at least `ports` distinct destination ports or
//! `hosts` distinct destination addresses within `window` of event time is
//! a scanner: ONE incident is raised, and for `cooldown` after it the
//! source raises no other incident and its audits are aggregated over
//! ports (one audit per destination address, verdict and decider, port 0),
//! so a scan of thousands of ports yields a bounded number of audits.
//! Allowed traffic never counts: a known connection is not a probe.
//!
//! The window is tumbling: it starts at the first anomalous connection
//! after the previous window ended. The state per source is small (at most
//! `ports` ports and `hosts` addresses) and lives in the store, so a
//! restart neither forgets a scan in progress nor raises its incident twice.

use std::time::Duration;

use crate::store::ScanRecord;

/// Default distinct ports that make a scan.
pub const DEFAULT_PORTS: u32 = 20;
/// Default distinct destination addresses that make a scan.
pub const DEFAULT_HOSTS: u32 = 20;
/// Default detection window, seconds.
pub const DEFAULT_WINDOW_SECONDS: u64 = 5;
/// Default quiet period after an incident, seconds.
pub const DEFAULT_COOLDOWN_SECONDS: u64 = 300;

/// Thresholds of the detector.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanSettings {
    /// Distinct destination ports within the window that make a scan.
    pub ports: u32,
    /// Distinct destination addresses within the window that make a scan.
    pub hosts: u32,
    /// The detection window (event time).
    pub window: Duration,
    /// How long a detected scanner stays one (event time).
    pub cooldown: Duration,
}

impl Default for ScanSettings {
    fn default() -> Self {
        Self {
            ports: DEFAULT_PORTS,
            hosts: DEFAULT_HOSTS,
            window: Duration::from_secs(DEFAULT_WINDOW_SECONDS),
            cooldown: Duration::from_secs(DEFAULT_COOLDOWN_SECONDS),
        }
    }
}

/// What one anomalous connection did to its source's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Nothing special: audit it as usual.
    Normal,
    /// This connection made the source a scanner: raise the incident.
    Detected {
        /// Distinct ports seen in the window.
        ports: usize,
        /// Distinct addresses seen in the window.
        hosts: usize,
        /// When the window started.
        window_start: i64,
    },
    /// The source is a known scanner: aggregate its audit over ports.
    Suppressed,
}

impl Outcome {
    /// True when the audit of this connection is aggregated over ports.
    pub fn aggregates_ports(&self) -> bool {
        !matches!(self, Outcome::Normal)
    }
}

fn nanos(duration: Duration) -> i64 {
    i64::try_from(duration.as_nanos()).unwrap_or(i64::MAX)
}

/// Folds one anomalous connection at event time `time` to `host:port` into
/// `record`.
pub fn observe(settings: &ScanSettings, record: &mut ScanRecord, time: i64, host: &str, port: u32) -> Outcome {
    if time < record.cooldown_until_unix_nanos {
        return Outcome::Suppressed;
    }
    let fresh = record.ports.is_empty() && record.hosts.is_empty();
    if fresh
        || time < record.window_start_unix_nanos
        || time.saturating_sub(record.window_start_unix_nanos) > nanos(settings.window)
    {
        record.window_start_unix_nanos = time;
        record.ports.clear();
        record.hosts.clear();
    }
    if !record.ports.contains(&port) {
        record.ports.push(port);
    }
    if !record.hosts.iter().any(|known| known == host) {
        record.hosts.push(host.to_owned());
    }
    let (ports, hosts) = (record.ports.len(), record.hosts.len());
    if ports >= settings.ports as usize || hosts >= settings.hosts as usize {
        let window_start = record.window_start_unix_nanos;
        record.cooldown_until_unix_nanos = time.saturating_add(nanos(settings.cooldown));
        record.ports.clear();
        record.hosts.clear();
        return Outcome::Detected {
            ports,
            hosts,
            window_start,
        };
    }
    Outcome::Normal
}

#[cfg(test)]
mod tests {
    use super::*;

    const SECOND: i64 = 1_000_000_000;

    #[test]
    fn many_ports_in_the_window_is_one_detection_then_suppression() {
        let settings = ScanSettings::default();
        let mut record = ScanRecord::default();
        let mut detections = 0;
        for port in 1..=1000u32 {
            match observe(&settings, &mut record, i64::from(port) * 1_000_000, "10.0.0.2", port) {
                Outcome::Detected { ports, hosts, .. } => {
                    detections += 1;
                    assert_eq!((ports, hosts), (20, 1));
                    assert_eq!(port, 20);
                }
                Outcome::Suppressed => assert!(port > 20),
                Outcome::Normal => assert!(port < 20),
            }
        }
        assert_eq!(detections, 1);
    }

    #[test]
    fn slow_probes_spread_over_windows_are_not_a_scan() {
        let settings = ScanSettings::default();
        let mut record = ScanRecord::default();
        for port in 1..=100u32 {
            let outcome = observe(&settings, &mut record, i64::from(port) * SECOND, "10.0.0.2", port);
            assert_eq!(outcome, Outcome::Normal, "port {port}");
        }
    }

    #[test]
    fn many_hosts_is_a_sweep_and_a_new_scan_after_cooldown_is_reported_again() {
        let settings = ScanSettings::default();
        let mut record = ScanRecord::default();
        let mut detected = Vec::new();
        for round in 0..2i64 {
            let base = round * 400 * SECOND;
            for host in 0..25 {
                let outcome = observe(&settings, &mut record, base + host, &format!("10.0.1.{host}"), 22);
                if matches!(outcome, Outcome::Detected { .. }) {
                    detected.push((round, host));
                }
            }
        }
        assert_eq!(detected, vec![(0, 19), (1, 19)]);
    }
}
