//! The workers' figures, merged: each worker sends its cumulative figures once a second (only
//! the series that changed, and its totals); the supervisor keeps the latest of every running
//! worker, and adds those of a worker that ended to the figures of the ended ones, so that a
//! counter never goes back when a worker is replaced, killed or retired by an upgrade of one
//! worker. Queries merge the lot (histograms bucket by bucket, so percentiles are those of the
//! merged distribution).

use std::collections::HashMap;

use rampart_command::metrics::{Merged, SeriesKey, series_key};
use rampart_command::proto::{MetricSeries, MetricsReport, WorkerTotals};

/// One worker process's latest figures.
#[derive(Default)]
struct Process {
    series: HashMap<SeriesKey, MetricSeries>,
    totals: WorkerTotals,
}

#[derive(Default)]
pub(super) struct MetricsStore {
    live: HashMap<i32, Process>,
    /// Figures of processes that ended.
    ended: Merged,
}

impl MetricsStore {
    /// A report (or a piece of one) from the worker with this pid.
    pub(super) fn update(&mut self, pid: i32, report: MetricsReport) {
        let process = self.live.entry(pid).or_default();
        if let Some(totals) = report.totals {
            process.totals = totals;
        }
        for series in report.series {
            process.series.insert(series_key(&series), series);
        }
    }

    /// The worker ended: its last figures join those of the ended processes.
    pub(super) fn ended(&mut self, pid: i32) {
        let Some(process) = self.live.remove(&pid) else { return };
        let mut totals = process.totals;
        totals.connections_active = 0;
        add_process(&mut self.ended, &process.series, &totals);
        self.ended.processes += 1;
    }

    /// Every process's figures, merged; series of `cluster` and of `backend` when given.
    pub(super) fn report(&self, cluster: &str, backend: &str) -> MetricsReport {
        let mut merged = self.ended.clone();
        for process in self.live.values() {
            add_process(&mut merged, &process.series, &process.totals);
            merged.processes += 1;
        }
        merged.report(cluster, backend)
    }
}

fn add_process(merged: &mut Merged, series: &HashMap<SeriesKey, MetricSeries>, totals: &WorkerTotals) {
    for (key, s) in series {
        merged.series.entry(key.clone()).or_default().add(s);
    }
    merged.add_totals(totals);
}

#[cfg(test)]
mod tests {
    use super::*;
    use rampart_command::metrics::Buckets;

    fn report(cluster: &str, ok: u64, requests: u64) -> MetricsReport {
        let mut time = Buckets::default();
        for _ in 0..ok {
            time.record(250);
        }
        MetricsReport {
            series: vec![MetricSeries {
                cluster_id: cluster.into(),
                status_classes: vec![0, 0, ok, 0, 0, 0],
                requests: ok,
                request_time: Some(time.to_proto()),
                ..Default::default()
            }],
            totals: Some(WorkerTotals {
                requests,
                connections_active: 2,
                ..Default::default()
            }),
            processes: 0,
        }
    }

    #[test]
    fn figures_of_ended_workers_are_kept_and_later_reports_replace_earlier_ones() {
        let mut store = MetricsStore::default();
        store.update(10, report("a", 3, 3));
        store.update(10, report("a", 5, 5)); // cumulative: replaces, does not add
        store.update(11, report("a", 2, 4));
        let r = store.report("", "");
        assert_eq!(r.totals.as_ref().unwrap().requests, 9);
        assert_eq!(r.series[0].status_classes[2], 7);
        assert_eq!(r.series[0].request_time.as_ref().unwrap().total, 7);
        assert!(r.series[0].request_time.as_ref().unwrap().p99_us >= 250);
        store.ended(10);
        store.update(12, report("a", 1, 1));
        let r = store.report("a", "");
        assert_eq!(
            r.totals.as_ref().unwrap().requests,
            10,
            "an ended worker's requests still count"
        );
        assert_eq!(
            r.totals.as_ref().unwrap().connections_active,
            4,
            "but not its connections"
        );
        assert_eq!(r.series[0].requests, 8);
        assert_eq!(r.processes, 3);
        assert!(store.report("b", "").series.is_empty());
    }
}
