//! The scheduler of `sluice serve`: which mappings are due, and the loop that runs them.
//!
//! Each enabled mapping with a schedule has a next fire time. A tick compares the clock with
//! them (a scan of plain timestamps, so a thousand mappings cost microseconds) and starts the
//! due ones, grouped by model so that one extraction serves every due mapping of a model. A
//! mapping whose previous run is still going is not started twice: the run's lease makes the
//! new one record itself as skipped.
//!
//! Several processes sharing one metadata store (replicas of `sluice serve`) each run this
//! scheduler, and each fire time starts one run among them: a due mapping is first claimed in
//! the store ([`crate::metadata::MetadataStore::claim_fire`]), and a scheduler that finds
//! another process fired it since takes that fire as the mapping's latest start
//! ([`Scheduler::observe_fire`]). So a replica that dies leaves its share of the fires to the
//! others, with no hand-over.
//!
//! Clocks: a fire time missed while sluice was down, or skipped over by a clock jumping
//! forward, fires once (never replayed per missed slot); when the clock goes back, fire times
//! are worked out again from the new time, so an interval schedule does not stall for the
//! length of the jump.

use std::collections::HashMap;

use chrono::{DateTime, Utc};

use crate::engine::Engine;
use crate::error::Result;
use crate::schedule::Schedule;

/// One scheduled mapping.
#[derive(Debug, Clone)]
struct Entry {
    mapping: String,
    model: String,
    schedule: Schedule,
    /// Start of the latest run, the anchor of `every:` intervals.
    last_start: Option<DateTime<Utc>>,
    next_due: Option<DateTime<Utc>>,
    /// An `after:` or `after_dbt:` mapping found due: the latest finish of its prerequisites
    /// (or time of the event) that made it so (a fire another process made at or after it
    /// covers this one).
    waiting_since: Option<DateTime<Utc>>,
    /// An `after_dbt:` mapping: the external events any of which makes it due.
    events: Vec<String>,
}

/// Fire times of every scheduled mapping.
#[derive(Debug, Clone, Default)]
pub struct Scheduler {
    entries: Vec<Entry>,
    last_tick: Option<DateTime<Utc>>,
    /// When scheduling began: an `after:` mapping that never ran waits for prerequisites that
    /// finish after this.
    started: Option<DateTime<Utc>>,
}

/// A mapping that is due, and its model.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Due {
    pub mapping: String,
    pub model: String,
}

impl Scheduler {
    /// `mappings`: (mapping, model, schedule) of each enabled mapping; `last_starts`: when each
    /// last ran.
    pub fn new(
        mappings: impl IntoIterator<Item = (String, String, Schedule)>,
        last_starts: &HashMap<String, DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Self {
        let entries = mappings
            .into_iter()
            .filter(|(_, _, schedule)| !matches!(schedule, Schedule::Manual))
            .map(|(mapping, model, schedule)| {
                let last_start = last_starts.get(&mapping).copied();
                // A first interval run is due now; anything else at its next fire time.
                let next_due = schedule.next_after(now, last_start);
                Entry {
                    mapping,
                    model,
                    schedule,
                    last_start,
                    next_due,
                    waiting_since: None,
                    events: Vec::new(),
                }
            })
            .collect();
        Self {
            entries,
            last_tick: None,
            started: Some(now),
        }
    }

    /// Whether some mapping runs `after:` others (so their successes are worth looking up).
    pub fn has_sequences(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.schedule, Schedule::After(_)))
    }

    /// Whether some mapping runs `after_dbt:` (so external events are worth looking up).
    pub fn has_external_triggers(&self) -> bool {
        self.entries
            .iter()
            .any(|e| matches!(e.schedule, Schedule::AfterDbt { .. }))
    }

    /// The external events (see [`crate::dbt::events_of`]) any of which makes `after_dbt:`
    /// mapping `mapping` due.
    pub fn set_events(&mut self, mapping: &str, events: Vec<String>) {
        if let Some(entry) = self.entries.iter_mut().find(|e| e.mapping == mapping) {
            entry.events = events;
        }
    }

    /// The `after_dbt:` mappings that are due: one of their events happened since they last
    /// started (or, for one that never ran, since scheduling began). `happened` holds each
    /// event's latest time.
    pub fn due_on_events(
        &mut self,
        happened: &HashMap<String, DateTime<Utc>>,
        now: DateTime<Utc>,
    ) -> Vec<Due> {
        self.due_when(now, |entry, anchor| {
            if !matches!(entry.schedule, Schedule::AfterDbt { .. }) {
                return None;
            }
            entry
                .events
                .iter()
                .filter_map(|name| happened.get(name).copied())
                .filter(|t| *t > anchor)
                .max()
        })
    }

    /// The `after:` mappings that are due: each mapping they run after has finished a
    /// successful run since they last started (or, for one that never ran, since scheduling
    /// began). `succeeded` holds each mapping's latest successful finish.
    pub fn due_after(&mut self, succeeded: &HashMap<String, DateTime<Utc>>, now: DateTime<Utc>) -> Vec<Due> {
        self.due_when(now, |entry, anchor| {
            let Schedule::After(before) = &entry.schedule else {
                return None;
            };
            let finishes: Option<Vec<DateTime<Utc>>> = before
                .iter()
                .map(|m| succeeded.get(m).copied().filter(|t| *t > anchor))
                .collect();
            finishes.and_then(|f| f.into_iter().max())
        })
    }

    /// The mappings `ready` finds due: given an entry and its anchor (its last start, or when
    /// scheduling began), the time of what made it due. Each is marked started at `now`, waiting
    /// since that time (a fire another process made at or after it covers this one).
    fn due_when(
        &mut self,
        now: DateTime<Utc>,
        ready: impl Fn(&Entry, DateTime<Utc>) -> Option<DateTime<Utc>>,
    ) -> Vec<Due> {
        let started = self.started.unwrap_or(now);
        let mut due = Vec::new();
        for entry in &mut self.entries {
            let anchor = entry.last_start.unwrap_or(started);
            if let Some(since) = ready(entry, anchor) {
                entry.waiting_since = Some(since);
                entry.last_start = Some(now);
                due.push(Due {
                    mapping: entry.mapping.clone(),
                    model: entry.model.clone(),
                });
            }
        }
        due
    }

    /// The scheduled mappings of `engine`'s project (enabled ones only), anchored on their
    /// latest run or scheduled fire in any process sharing the metadata store.
    pub async fn for_engine(engine: &Engine, now: DateTime<Utc>) -> Result<Self> {
        let mut last: HashMap<String, DateTime<Utc>> = engine
            .metadata()
            .last_runs()
            .await?
            .into_iter()
            .map(|(mapping, run)| (mapping, run.started_at))
            .collect();
        for (mapping, fired_at) in engine.metadata().schedule_fires().await? {
            let latest = last.entry(mapping).or_insert(fired_at);
            *latest = (*latest).max(fired_at);
        }
        let project = engine.project();
        let mappings: Vec<(String, String, Schedule)> = project
            .config
            .mappings
            .iter()
            .filter(|(_, m)| m.enabled)
            .map(|(name, m)| (name.clone(), m.model.clone(), project.schedule_of(name)))
            .collect();
        let names: Vec<String> = mappings.iter().map(|(name, _, _)| name.clone()).collect();
        let mut scheduler = Self::new(mappings, &last, now);
        for mapping in names {
            if let Some(events) = project.after_dbt_events(&mapping) {
                scheduler.set_events(&mapping, events);
            }
        }
        Ok(scheduler)
    }

    /// Keeps the fire times of `previous` for mappings whose schedule did not change (when the
    /// definitions change while `sluice serve` runs), so a run just started is not due again.
    pub fn carry_over(&mut self, previous: &Scheduler) {
        for entry in &mut self.entries {
            if let Some(old) = previous
                .entries
                .iter()
                .find(|e| e.mapping == entry.mapping && e.schedule == entry.schedule)
            {
                entry.last_start = old.last_start;
                entry.next_due = old.next_due;
                entry.waiting_since = old.waiting_since;
            }
        }
        self.last_tick = previous.last_tick;
        self.started = previous.started.or(self.started);
    }

    /// Number of scheduled mappings.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The mappings due at `now`, and their next fire times set.
    pub fn tick(&mut self, now: DateTime<Utc>) -> Vec<Due> {
        if self.last_tick.is_some_and(|last| now < last) {
            // The clock went back: fire times computed on the old clock would wait out the jump.
            for entry in &mut self.entries {
                entry.last_start = entry.last_start.map(|t| t.min(now));
                entry.next_due = entry.schedule.next_after(now, entry.last_start);
            }
        }
        self.last_tick = Some(now);
        let mut due = Vec::new();
        for entry in &mut self.entries {
            if entry.next_due.is_some_and(|t| t <= now) {
                due.push(Due {
                    mapping: entry.mapping.clone(),
                    model: entry.model.clone(),
                });
                entry.last_start = Some(now);
                // The next fire time after `now`: one that was missed fires once, not per slot.
                entry.next_due = entry.schedule.next_after(now, Some(now));
            }
        }
        due
    }

    /// Another process sharing the metadata store last fired `mapping` at `fired_at`: when
    /// that fire covers the one this scheduler found due, the mapping is not due after all and
    /// its next fire time follows from `fired_at`. Returns whether `mapping` is still due at
    /// `now`.
    pub fn observe_fire(&mut self, mapping: &str, fired_at: DateTime<Utc>, now: DateTime<Utc>) -> bool {
        let Some(entry) = self.entries.iter_mut().find(|e| e.mapping == mapping) else {
            return false;
        };
        if let Schedule::After(_) | Schedule::AfterDbt { .. } = entry.schedule {
            // Covered by a fire made once its prerequisites had finished.
            let covered = entry.waiting_since.is_some_and(|t| fired_at >= t);
            if covered {
                entry.last_start = Some(fired_at);
            }
            return !covered;
        }
        let next = entry.schedule.next_after(fired_at, Some(fired_at));
        if next.is_some_and(|t| t <= now) {
            return true;
        }
        entry.last_start = Some(fired_at);
        entry.next_due = next;
        false
    }

    /// The earliest next fire time.
    pub fn next_wake(&self) -> Option<DateTime<Utc>> {
        self.entries.iter().filter_map(|e| e.next_due).min()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::TimeZone;
    use std::time::Duration;

    fn at(h: u32, m: u32) -> DateTime<Utc> {
        Utc.with_ymd_and_hms(2026, 3, 2, h, m, 0).single().unwrap()
    }

    fn every(minutes: u64) -> Schedule {
        Schedule::Every(Duration::from_secs(minutes * 60))
    }

    fn names(due: Vec<Due>) -> Vec<String> {
        due.into_iter().map(|d| d.mapping).collect()
    }

    #[test]
    fn an_interval_fires_first_at_once_then_every_interval() {
        let mut s = Scheduler::new([("a".into(), "m".into(), every(15))], &HashMap::new(), at(9, 0));
        assert_eq!(names(s.tick(at(9, 0))), ["a"]);
        assert!(s.tick(at(9, 14)).is_empty());
        assert_eq!(names(s.tick(at(9, 15))), ["a"]);
        assert_eq!(s.next_wake(), Some(at(9, 30)));
    }

    #[test]
    fn an_interval_is_anchored_on_the_last_run() {
        let last = HashMap::from([("a".to_string(), at(8, 55))]);
        let mut s = Scheduler::new([("a".into(), "m".into(), every(15))], &last, at(9, 0));
        assert!(s.tick(at(9, 0)).is_empty());
        assert_eq!(names(s.tick(at(9, 10))), ["a"]);
    }

    #[test]
    fn missed_fire_times_fire_once() {
        let mut s = Scheduler::new([("a".into(), "m".into(), every(5))], &HashMap::new(), at(9, 0));
        assert_eq!(names(s.tick(at(9, 0))), ["a"]);
        // The clock jumps an hour forward (or the machine slept): one run, not twelve.
        assert_eq!(names(s.tick(at(10, 0))), ["a"]);
        assert!(s.tick(at(10, 1)).is_empty());
        assert_eq!(names(s.tick(at(10, 5))), ["a"]);
    }

    #[test]
    fn a_clock_that_goes_back_does_not_stall_an_interval() {
        let mut s = Scheduler::new([("a".into(), "m".into(), every(5))], &HashMap::new(), at(10, 0));
        assert_eq!(names(s.tick(at(10, 0))), ["a"]);
        // An hour back: the run that just happened counts as now, so the next is five minutes
        // on, not an hour and five minutes.
        assert!(s.tick(at(9, 0)).is_empty());
        assert_eq!(s.next_wake(), Some(at(9, 5)));
        assert!(s.tick(at(9, 4)).is_empty());
        assert_eq!(names(s.tick(at(9, 5))), ["a"]);
    }

    #[test]
    fn a_rebuilt_schedule_keeps_fire_times_of_unchanged_mappings() {
        let mut s = Scheduler::new([("a".into(), "m".into(), every(15))], &HashMap::new(), at(9, 0));
        assert_eq!(names(s.tick(at(9, 0))), ["a"]);
        // Definitions change a second later: `a` must not be due again, `b` is new.
        let mut rebuilt = Scheduler::new(
            [
                ("a".into(), "m".into(), every(15)),
                ("b".into(), "m".into(), every(5)),
            ],
            &HashMap::new(),
            at(9, 0),
        );
        rebuilt.carry_over(&s);
        assert_eq!(names(rebuilt.tick(at(9, 0))), ["b"]);
        assert_eq!(names(rebuilt.tick(at(9, 15))), ["a", "b"]);
    }

    #[test]
    fn a_fire_another_process_made_is_not_made_again() {
        let mut s = Scheduler::new([("a".into(), "m".into(), every(15))], &HashMap::new(), at(9, 0));
        assert_eq!(names(s.tick(at(9, 0))), ["a"]);
        assert_eq!(names(s.tick(at(9, 15))), ["a"]);
        // Another replica fired `a` at 9:14 (its interval is anchored on its own last start):
        // this one's 9:15 fire is covered, and the next is 9:29.
        assert!(!s.observe_fire("a", at(9, 14), at(9, 15)));
        assert_eq!(s.next_wake(), Some(at(9, 29)));
        assert!(s.tick(at(9, 28)).is_empty());
        assert_eq!(names(s.tick(at(9, 29))), ["a"]);
        // A fire older than an interval does not cover a due one.
        assert!(s.observe_fire("a", at(9, 0), at(9, 29)));

        let cron: Schedule = serde_norway::from_str("cron: '*/10 * * * *'").unwrap();
        let mut s = Scheduler::new([("c".into(), "m".into(), cron)], &HashMap::new(), at(9, 0));
        assert_eq!(names(s.tick(at(9, 10))), ["c"]);
        // The 9:10 fire was made a moment after 9:10 by another replica.
        let moment = at(9, 10) + chrono::Duration::milliseconds(40);
        assert!(!s.observe_fire("c", moment, at(9, 10) + chrono::Duration::milliseconds(90)));
        assert_eq!(s.next_wake(), Some(at(9, 20)));
        // A fire of the 9:00 slot does not cover 9:10's.
        assert!(s.observe_fire("c", at(9, 0), at(9, 10)));
        // A mapping this scheduler does not have is never due here.
        assert!(!s.observe_fire("gone", at(9, 0), at(9, 10)));
    }

    #[test]
    fn a_sequence_runs_once_each_prerequisite_has_succeeded_since_it_last_started() {
        let after = Schedule::After(vec!["a".into(), "b".into()]);
        let mut s = Scheduler::new([("c".into(), "m".into(), after)], &HashMap::new(), at(9, 0));
        assert!(s.has_sequences());
        assert!(s.tick(at(9, 0)).is_empty(), "never due by the clock");
        assert_eq!(s.next_wake(), None);
        // Successes from before scheduling began do not count for a mapping that never ran.
        let mut succeeded = HashMap::from([("a".to_string(), at(8, 0)), ("b".to_string(), at(8, 5))]);
        assert!(s.due_after(&succeeded, at(9, 1)).is_empty());
        succeeded.insert("a".into(), at(9, 10));
        assert!(
            s.due_after(&succeeded, at(9, 11)).is_empty(),
            "b has not run since"
        );
        succeeded.insert("b".into(), at(9, 20));
        assert_eq!(names(s.due_after(&succeeded, at(9, 21))), ["c"]);
        assert!(s.due_after(&succeeded, at(9, 22)).is_empty(), "once per round");
        // Another process fired c at 9:21 too, after the finishes: covered.
        assert!(!s.observe_fire("c", at(9, 21), at(9, 21)));
        // A fire before the finishes (the previous round) does not cover a new one.
        succeeded.insert("a".into(), at(10, 0));
        succeeded.insert("b".into(), at(10, 5));
        assert_eq!(names(s.due_after(&succeeded, at(10, 6))), ["c"]);
        assert!(s.observe_fire("c", at(9, 21), at(10, 6)));
    }

    #[test]
    fn after_dbt_runs_once_per_event_newer_than_its_last_start() {
        let after_dbt = Schedule::AfterDbt { jobs: Vec::new() };
        let mut s = Scheduler::new(
            [
                ("c".into(), "m".into(), after_dbt),
                ("clock".into(), "m".into(), every(60)),
            ],
            &HashMap::new(),
            at(9, 0),
        );
        s.set_events(
            "c",
            vec!["dbt_job:*".into(), "dbt_node:model.shop.customers".into()],
        );
        assert!(s.has_external_triggers());
        assert!(!s.has_sequences());
        // Events from before scheduling began, and events it does not wait for, do not count.
        let mut happened = HashMap::from([
            ("dbt_node:model.shop.customers".to_string(), at(8, 0)),
            ("dbt_node:model.shop.orders".to_string(), at(9, 5)),
        ]);
        assert!(s.due_on_events(&happened, at(9, 6)).is_empty());
        happened.insert("dbt_node:model.shop.customers".into(), at(9, 10));
        assert_eq!(names(s.due_on_events(&happened, at(9, 11))), ["c"]);
        assert!(s.due_on_events(&happened, at(9, 12)).is_empty(), "once per event");
        // Another process fired it after the event: covered.
        assert!(!s.observe_fire("c", at(9, 11), at(9, 11)));
        happened.insert("dbt_job:*".into(), at(9, 30));
        assert_eq!(names(s.due_on_events(&happened, at(9, 31))), ["c"]);
        // A fire from before this event does not cover it.
        assert!(s.observe_fire("c", at(9, 11), at(9, 31)));
    }

    #[test]
    fn cron_and_manual() {
        let cron: Schedule = serde_norway::from_str("cron: '30 9 * * *'").unwrap();
        let mut s = Scheduler::new(
            [
                ("c".into(), "m".into(), cron),
                ("manual".into(), "m".into(), Schedule::Manual),
            ],
            &HashMap::new(),
            at(9, 0),
        );
        assert_eq!(s.len(), 1);
        assert!(s.tick(at(9, 29)).is_empty());
        assert_eq!(names(s.tick(at(9, 30))), ["c"]);
        assert!(s.tick(at(9, 31)).is_empty());
    }
}
