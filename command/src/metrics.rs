//! The metric figures every process agrees on: the latency scale of histograms, and how figures
//! from many workers are merged (counters add, histograms add bucket by bucket, percentiles are
//! read from the merged buckets, never averaged).
//!
//! The scale is log-linear: four buckets per power of two of microseconds, from 1 µs to about
//! 2^27 µs (134 s); bucket `i` holds values up to `bucket_bound(i)`, the last one everything
//! above. A value falls in its bucket in a few instructions, and a bucket's bound is at most
//! 25 % above any value in it.

use std::collections::BTreeMap;

use crate::proto::{Histogram, MetricSeries, MetricsReport, WorkerTotals};

/// Sub-buckets per power of two.
const SUB: u32 = 4;
/// Powers of two covered.
const OCTAVES: u32 = 27;
/// Buckets in all.
pub const BUCKETS: usize = (SUB * OCTAVES + 1) as usize;

/// The bucket of a value in microseconds.
pub fn bucket_of(us: u64) -> usize {
    if us <= u64::from(SUB) {
        return us.saturating_sub(1) as usize;
    }
    // us - 1 lies in [2^octave, 2^(octave+1)); the two bits below the leading one pick the
    // quarter of that octave.
    let v = us - 1;
    let octave = u64::from(63 - v.leading_zeros());
    let sub = (v >> (octave - 2)) & u64::from(SUB - 1);
    let index = u64::from(SUB) * (octave - 1) + sub;
    usize::try_from(index).unwrap_or(usize::MAX).min(BUCKETS - 1)
}

/// The largest value (µs) bucket `i` holds; the last bucket is unbounded (`u64::MAX`).
pub fn bucket_bound(i: usize) -> u64 {
    if i + 1 >= BUCKETS {
        return u64::MAX;
    }
    if i < SUB as usize {
        return i as u64 + 1;
    }
    // Buckets from SUB on: octave o (>= 2) has buckets (o-1)*SUB .. o*SUB-1 covering (2^o, 2^(o+1)].
    let i = i as u32;
    let octave = i / SUB + 1;
    let sub = i % SUB;
    let base = 1u64 << octave;
    base + (base / u64::from(SUB)) * (u64::from(sub) + 1)
}

/// A histogram being filled: a fixed array, no allocation per value.
#[derive(Debug, Clone)]
pub struct Buckets {
    pub counts: [u64; BUCKETS],
    pub total: u64,
    pub sum_us: u64,
}

impl Default for Buckets {
    fn default() -> Self {
        Buckets {
            counts: [0; BUCKETS],
            total: 0,
            sum_us: 0,
        }
    }
}

impl Buckets {
    pub fn record(&mut self, us: u64) {
        if let Some(c) = self.counts.get_mut(bucket_of(us)) {
            *c += 1;
        }
        self.total += 1;
        self.sum_us = self.sum_us.saturating_add(us);
    }

    /// The sparse form sent over the channel and in answers.
    pub fn to_proto(&self) -> Histogram {
        let mut h = Histogram {
            total: self.total,
            sum_us: self.sum_us,
            ..Default::default()
        };
        for (i, c) in self.counts.iter().enumerate() {
            if *c > 0 {
                h.index.push(i as u32);
                h.count.push(*c);
            }
        }
        h
    }

    pub fn add_proto(&mut self, h: &Histogram) {
        for (i, c) in h.index.iter().zip(&h.count) {
            if let Some(slot) = self.counts.get_mut(*i as usize) {
                *slot += c;
            }
        }
        self.total += h.total;
        self.sum_us = self.sum_us.saturating_add(h.sum_us);
    }

    /// The upper bound of the bucket holding the `q`-quantile (0 when empty).
    pub fn quantile(&self, q: f64) -> u64 {
        if self.total == 0 {
            return 0;
        }
        let rank = ((self.total as f64) * q).ceil().max(1.0) as u64;
        let mut seen = 0u64;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= rank {
                return bucket_bound(i);
            }
        }
        bucket_bound(BUCKETS - 1)
    }

    /// The sparse form with its percentiles filled in.
    pub fn summary(&self) -> Histogram {
        Histogram {
            p50_us: self.quantile(0.5),
            p90_us: self.quantile(0.9),
            p99_us: self.quantile(0.99),
            p999_us: self.quantile(0.999),
            ..self.to_proto()
        }
    }
}

/// Checks a statsd target: an IP address and port, and a prefix of letters, digits, `_`, `-`
/// and `.`.
pub fn check_statsd(address: &str, prefix: &str) -> Result<(), String> {
    if address.parse::<std::net::SocketAddr>().is_err() {
        return Err(format!(
            "statsd address `{address}` is not an IP address and port such as 127.0.0.1:8125"
        ));
    }
    if prefix.is_empty()
        || !prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
    {
        return Err(format!(
            "statsd prefix `{prefix}` must be letters, digits, `_`, `-` and `.` only"
        ));
    }
    Ok(())
}

/// The key of a series: (listener, cluster, backend), the unused parts empty.
pub type SeriesKey = (String, String, String);

pub fn series_key(s: &MetricSeries) -> SeriesKey {
    (s.listener.clone(), s.cluster_id.clone(), s.backend_id.clone())
}

/// A series being merged.
#[derive(Debug, Clone, Default)]
pub struct MergedSeries {
    pub status_classes: [u64; 6],
    pub requests: u64,
    pub failed: u64,
    pub tunnels: u64,
    pub bytes_in: u64,
    pub bytes_out: u64,
    pub request_time: Buckets,
    pub connect_time: Buckets,
    pub first_byte_time: Buckets,
}

impl MergedSeries {
    pub fn add(&mut self, s: &MetricSeries) {
        for (slot, v) in self.status_classes.iter_mut().zip(&s.status_classes) {
            *slot += v;
        }
        self.requests += s.requests;
        self.failed += s.failed;
        self.tunnels += s.tunnels;
        self.bytes_in += s.bytes_in;
        self.bytes_out += s.bytes_out;
        for (mine, theirs) in [
            (&mut self.request_time, &s.request_time),
            (&mut self.connect_time, &s.connect_time),
            (&mut self.first_byte_time, &s.first_byte_time),
        ] {
            if let Some(h) = theirs {
                mine.add_proto(h);
            }
        }
    }

    pub fn to_proto(&self, key: &SeriesKey, summaries: bool) -> MetricSeries {
        let hist = |b: &Buckets| Some(if summaries { b.summary() } else { b.to_proto() });
        MetricSeries {
            listener: key.0.clone(),
            cluster_id: key.1.clone(),
            backend_id: key.2.clone(),
            status_classes: self.status_classes.to_vec(),
            requests: self.requests,
            failed: self.failed,
            tunnels: self.tunnels,
            bytes_in: self.bytes_in,
            bytes_out: self.bytes_out,
            request_time: hist(&self.request_time),
            connect_time: hist(&self.connect_time),
            first_byte_time: hist(&self.first_byte_time),
        }
    }
}

/// Every series of one or many processes, merged.
#[derive(Debug, Clone, Default)]
pub struct Merged {
    pub series: BTreeMap<SeriesKey, MergedSeries>,
    pub totals: WorkerTotals,
    pub processes: u32,
}

impl Merged {
    pub fn add_totals(&mut self, t: &WorkerTotals) {
        let mine = &mut self.totals;
        mine.connections_accepted += t.connections_accepted;
        mine.connections_active += t.connections_active;
        mine.tls_handshakes += t.tls_handshakes;
        mine.tls_handshake_failures += t.tls_handshake_failures;
        for (version, n) in &t.tls_versions {
            *mine.tls_versions.entry(version.clone()).or_default() += n;
        }
        mine.backend_connect_errors += t.backend_connect_errors;
        mine.backend_retries += t.backend_retries;
        mine.series_overflow += t.series_overflow;
        mine.requests += t.requests;
    }

    /// The answer to a query: series of `cluster` (and its backends) and of `backend` when
    /// given, with their percentiles.
    pub fn report(&self, cluster: &str, backend: &str) -> MetricsReport {
        let series = self
            .series
            .iter()
            .filter(|(k, _)| cluster.is_empty() || k.1 == cluster)
            .filter(|(k, _)| backend.is_empty() || k.2 == backend)
            .map(|(k, s)| s.to_proto(k, true))
            .collect();
        MetricsReport {
            series,
            totals: Some(self.totals.clone()),
            processes: self.processes,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_value_falls_in_the_bucket_whose_bound_covers_it() {
        let mut previous_bound = 0;
        for i in 0..BUCKETS - 1 {
            let bound = bucket_bound(i);
            assert!(bound > previous_bound, "bounds grow: {i}");
            previous_bound = bound;
        }
        for us in (1..5000u64).chain([65_536, 1_000_000, 10_000_000, 100_000_000]) {
            let i = bucket_of(us);
            assert!(
                us <= bucket_bound(i),
                "{us} above its bucket {i}'s bound {}",
                bucket_bound(i)
            );
            if i > 0 {
                assert!(us > bucket_bound(i - 1), "{us} belongs to an earlier bucket than {i}");
            }
            assert!(
                bucket_bound(i) as f64 <= us as f64 * 1.34 || us <= 4,
                "{us}: bound {} too coarse",
                bucket_bound(i)
            );
        }
        assert_eq!(bucket_of(0), 0);
        assert_eq!(bucket_of(u64::MAX), BUCKETS - 1);
        assert_eq!(bucket_bound(BUCKETS - 1), u64::MAX);
    }

    #[test]
    fn percentiles_come_from_merged_buckets() {
        // Two workers: one fast, one slow. Averaging their p99s would say 5 ms; the merged
        // figures say what the clients saw.
        let (mut fast, mut slow) = (Buckets::default(), Buckets::default());
        for _ in 0..990 {
            fast.record(100);
        }
        for _ in 0..10 {
            slow.record(10_000);
        }
        let mut merged = Buckets::default();
        merged.add_proto(&fast.to_proto());
        merged.add_proto(&slow.to_proto());
        assert_eq!(merged.total, 1000);
        assert_eq!(merged.quantile(0.5), bucket_bound(bucket_of(100)));
        assert_eq!(merged.quantile(0.99), bucket_bound(bucket_of(100)));
        assert_eq!(merged.quantile(0.999), bucket_bound(bucket_of(10_000)));
        let s = merged.summary();
        assert_eq!((s.p50_us, s.p999_us), (merged.quantile(0.5), merged.quantile(0.999)));
        assert_eq!(s.sum_us, 990 * 100 + 10 * 10_000);
        assert_eq!(Buckets::default().quantile(0.5), 0);
    }
}
