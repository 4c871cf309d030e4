//! Scheduler tick cost: 1,000 configured mappings (a mix of `every`, `days`/`at` in several
//! time zones, and cron), ticked once a second over a simulated day, so every tick scans all
//! mappings and the ones due get their next fire time worked out. Prints CPU time per tick:
//! the mean, the worst, and the worst tick that had to reschedule mappings.
//!
//! `cargo bench --bench scheduler -- [mappings]` (default 1,000).

use std::collections::HashMap;
use std::time::{Duration, Instant};

use chrono::{TimeZone, Utc};
use sluice_engine::schedule::Schedule;
use sluice_engine::scheduler::Scheduler;

fn schedule(i: usize) -> Schedule {
    let yaml = match i % 4 {
        0 => format!("every: {}m", [1, 5, 15, 30, 60][i % 5]),
        1 => format!(
            "{{days: [mon, tue, wed, thu, fri], at: \"{:02}:{:02}\", timezone: {}}}",
            i % 24,
            (i * 7) % 60,
            ["Europe/Berlin", "America/New_York", "Asia/Tokyo", "UTC"][i % 4]
        ),
        2 => format!("cron: '{} */2 * * *'", i % 60),
        _ => format!("cron: '*/{} * * * *'", 1 + i % 10),
    };
    serde_norway::from_str(&yaml).expect("schedule")
}

fn main() {
    let mappings: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1000);
    let start = Utc.with_ymd_and_hms(2026, 3, 2, 0, 0, 0).single().expect("time");
    let entries = (0..mappings).map(|i| (format!("mapping_{i}"), format!("model_{}", i % 50), schedule(i)));
    let built = Instant::now();
    let mut scheduler = Scheduler::new(entries, &HashMap::new(), start);
    let build = built.elapsed();

    let ticks = 86_400;
    let mut total = Duration::ZERO;
    let mut worst = Duration::ZERO;
    let mut worst_busy = (Duration::ZERO, 0);
    let mut fired = 0usize;
    for second in 0..ticks {
        let now = start + chrono::Duration::seconds(second);
        let began = Instant::now();
        let due = scheduler.tick(now);
        let spent = began.elapsed();
        fired += due.len();
        total += spent;
        worst = worst.max(spent);
        if !due.is_empty() && spent > worst_busy.0 {
            worst_busy = (spent, due.len());
        }
        std::hint::black_box(due);
    }
    println!(
        "{mappings} mappings: built in {:.3} ms; {ticks} ticks (one simulated day), {fired} runs due",
        build.as_secs_f64() * 1e3
    );
    println!(
        "per tick: mean {:.1} µs, worst {:.3} ms; worst tick with runs due: {:.3} ms ({} mappings rescheduled)",
        total.as_secs_f64() * 1e6 / ticks as f64,
        worst.as_secs_f64() * 1e3,
        worst_busy.0.as_secs_f64() * 1e3,
        worst_busy.1
    );
}
