//! Measuring a whole process the way a user's job runs: wall time, its own CPU time and peak RSS
//! (`wait4`), with optional sampling of its RSS and of the machine's CPU every 100 ms.

// Shared by several benchmarks; each uses a part.
#![allow(dead_code)]

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// What one process cost.
#[derive(Debug, Clone, Copy)]
pub struct ProcessCost {
    pub wall: f64,
    pub cpu: f64,
    pub peak_rss_mib: f64,
    pub exit: i32,
}

/// What the sampler saw, every 100 ms of the process's life.
#[derive(Debug, Clone, Copy)]
pub struct Sample {
    /// Seconds since the process started.
    pub at: f64,
    pub rss_mib: Option<f64>,
    /// The process's own peak RSS so far (`VmHWM`): unlike `wait4`'s `ru_maxrss`, it does not
    /// count the parent's memory that a spawned child inherits until it executes.
    pub peak_mib: Option<f64>,
    /// The machine's busy and total CPU time so far (jiffies, all cores).
    pub cpu: (u64, u64),
}

/// Starts `command` and waits for it with `wait4`, sampling every 100 ms (its RSS too when
/// `sample_rss`).
pub fn measure(command: &mut Command, sample_rss: bool) -> (ProcessCost, Vec<Sample>) {
    let started = Instant::now();
    let child = command
        .spawn()
        .unwrap_or_else(|e| panic!("start {command:?}: {e}"));
    let pid = child.id() as libc::pid_t;
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let done = done.clone();
        std::thread::spawn(move || {
            let mut samples = Vec::new();
            let t0 = Instant::now();
            while !done.load(Ordering::Relaxed) {
                let rss_mib = if sample_rss {
                    status_mib(pid, "VmRSS:")
                } else {
                    None
                };
                let peak_mib = if sample_rss {
                    status_mib(pid, "VmHWM:")
                } else {
                    None
                };
                samples.push(Sample {
                    at: t0.elapsed().as_secs_f64(),
                    rss_mib,
                    peak_mib,
                    cpu: machine_cpu(),
                });
                std::thread::sleep(Duration::from_millis(100));
            }
            samples
        })
    };
    let mut status = 0;
    // SAFETY: a zeroed rusage is a valid value for wait4 to fill in.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: `pid` is our own child, not yet waited for; both pointers are valid for the call.
    let waited = unsafe { libc::wait4(pid, &mut status, 0, &mut usage) };
    assert_eq!(waited, pid, "wait4 on {command:?}");
    let wall = started.elapsed().as_secs_f64();
    done.store(true, Ordering::Relaxed);
    let samples = sampler.join().unwrap_or_default();
    let seconds = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    let exit = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        -1
    };
    // Already reaped by wait4.
    std::mem::forget(child);
    (
        ProcessCost {
            wall,
            cpu: seconds(usage.ru_utime) + seconds(usage.ru_stime),
            peak_rss_mib: usage.ru_maxrss as f64 / 1024.0,
            exit,
        },
        samples,
    )
}

/// A `/proc/<pid>/status` memory line (`VmRSS:`, `VmHWM:`) in MiB.
fn status_mib(pid: libc::pid_t, field: &str) -> Option<f64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.starts_with(field))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024.0)
}

/// Busy and total jiffies of the whole machine (`/proc/stat`).
pub fn machine_cpu() -> (u64, u64) {
    let stat = std::fs::read_to_string("/proc/stat").unwrap_or_default();
    let fields: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|v| v.parse().ok())
        .collect();
    let total: u64 = fields.iter().take(8).sum();
    // idle and iowait are the 4th and 5th fields.
    let idle = fields.get(3).copied().unwrap_or(0) + fields.get(4).copied().unwrap_or(0);
    (total - idle, total)
}

/// Peak sampled RSS within [from, to) seconds of the process's life.
pub fn peak_between(samples: &[Sample], from: f64, to: f64) -> f64 {
    samples
        .iter()
        .filter(|s| s.at >= from && s.at < to)
        .filter_map(|s| s.rss_mib)
        .fold(0.0, f64::max)
}

/// Share of the machine's CPU time that was busy within [from, to) seconds.
pub fn busy_between(samples: &[Sample], from: f64, to: f64) -> f64 {
    let within: Vec<&Sample> = samples.iter().filter(|s| s.at >= from && s.at < to).collect();
    match (within.first(), within.last()) {
        (Some(a), Some(b)) if b.cpu.1 > a.cpu.1 => (b.cpu.0 - a.cpu.0) as f64 / (b.cpu.1 - a.cpu.1) as f64,
        _ => 0.0,
    }
}

/// The median of `values` (the lower middle one for an even count).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    sorted
        .get(sorted.len().saturating_sub(1) / 2)
        .copied()
        .unwrap_or(f64::NAN)
}
