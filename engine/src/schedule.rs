//! When mappings run: `schedule:` on a model (the default for its mappings) or a mapping.
//!
//! ```yaml
//! schedule: manual                                    # only on demand (the default)
//! schedule: { every: 15m }                            # at least 1 minute
//! schedule: { days: [mon, thu], at: "09:00", timezone: Europe/Paris }
//! schedule: { cron: "0 */2 * * 1-5", timezone: America/New_York }
//! schedule: { after: [load_accounts, load_contacts] }  # when those have all succeeded since
//! schedule: { after_dbt: true }                       # when dbt has built the model's dbt models
//! schedule: { after_dbt: { jobs: [70403, nightly] } } # when one of these dbt Cloud jobs succeeds
//! ```
//!
//! Day-and-time and cron schedules are evaluated in their time zone (default UTC), through
//! daylight-saving changes: a local time that does not exist that day (02:30 when clocks jump
//! from 02:00 to 03:00) fires an hour later, and one that occurs twice fires once, at its first
//! occurrence. Cron expressions are parsed by `croner` (5 fields, or 6 with seconds;
//! `@hourly`-style nicknames; `L`, `#` and `W` modifiers).

use std::fmt;
use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, Datelike, NaiveTime, TimeZone, Utc, Weekday};
use chrono_tz::Tz;
use serde::Deserialize;
use serde::de::{self, Deserializer};

/// The shortest interval an `every:` schedule may have.
pub const MIN_INTERVAL: Duration = Duration::from_secs(60);

/// A parsed schedule.
#[derive(Debug, Clone, PartialEq)]
pub enum Schedule {
    /// Only on demand.
    Manual,
    /// A fixed interval after the previous scheduled run started.
    Every(Duration),
    /// Given weekdays at a local time.
    DaysAt {
        days: Vec<Weekday>,
        at: NaiveTime,
        timezone: Tz,
    },
    Cron {
        cron: Box<croner::Cron>,
        expression: String,
        timezone: Tz,
    },
    /// After other mappings: due once each of them has finished a successful run since this
    /// mapping last started (a sequence; see [`crate::scheduler`]).
    After(Vec<String>),
    /// After dbt: due once dbt has finished building what the mapping reads since it last
    /// started: a dbt Cloud job in `jobs` (by id or name) that succeeded, as its webhook tells;
    /// with no `jobs`, any successful dbt Cloud job, or a dbt invocation whose
    /// `run_results.json` shows the model's dbt models built and tested (see
    /// [`crate::dbt::events_of`]).
    AfterDbt { jobs: Vec<String> },
}

impl Schedule {
    /// When a mapping with this schedule runs next: the first fire time after `after`. For
    /// `every:`, `last_start` anchors the interval (the first run is due at once).
    pub fn next_after(
        &self,
        after: DateTime<Utc>,
        last_start: Option<DateTime<Utc>>,
    ) -> Option<DateTime<Utc>> {
        match self {
            Schedule::Manual | Schedule::After(_) | Schedule::AfterDbt { .. } => None,
            Schedule::Every(interval) => {
                let interval = chrono::Duration::from_std(*interval).ok()?;
                Some(match last_start {
                    None => after,
                    // A run missed while sluice was down is due at once, not replayed.
                    Some(last) => (last + interval).max(after),
                })
            }
            Schedule::DaysAt { days, at, timezone } => {
                let local = after.with_timezone(timezone);
                (0..=7).find_map(|offset| {
                    let date = local.date_naive() + chrono::Days::new(offset);
                    if !days.contains(&date.weekday()) {
                        return None;
                    }
                    let fire = local_instant(timezone, date.and_time(*at))?;
                    (fire > after).then_some(fire)
                })
            }
            Schedule::Cron { cron, timezone, .. } => cron
                .find_next_occurrence(&after.with_timezone(timezone), false)
                .ok()
                .map(|t| t.with_timezone(&Utc)),
        }
    }

    /// The next `n` fire times after `after` (for `sluice schedules` and the console).
    pub fn upcoming(
        &self,
        after: DateTime<Utc>,
        last_start: Option<DateTime<Utc>>,
        n: usize,
    ) -> Vec<DateTime<Utc>> {
        let mut times = Vec::with_capacity(n);
        let mut cursor = after;
        let mut last = last_start;
        while times.len() < n {
            let Some(next) = self.next_after(cursor, last) else {
                break;
            };
            times.push(next);
            cursor = next;
            last = Some(next);
        }
        times
    }
}

/// The instant of a local time in `timezone`: the first of two when clocks go back, an hour
/// later when the local time does not exist because clocks jumped forward.
fn local_instant(timezone: &Tz, local: chrono::NaiveDateTime) -> Option<DateTime<Utc>> {
    match timezone.from_local_datetime(&local) {
        chrono::LocalResult::Single(t) => Some(t.with_timezone(&Utc)),
        chrono::LocalResult::Ambiguous(first, _) => Some(first.with_timezone(&Utc)),
        chrono::LocalResult::None => timezone
            .from_local_datetime(&(local + chrono::Duration::hours(1)))
            .earliest()
            .map(|t| t.with_timezone(&Utc)),
    }
}

impl fmt::Display for Schedule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Schedule::Manual => f.write_str("manual"),
            Schedule::Every(interval) => write!(f, "every {}", humantime_like(*interval)),
            Schedule::DaysAt { days, at, timezone } => {
                let days: Vec<String> = days.iter().map(|d| d.to_string().to_lowercase()).collect();
                write!(f, "{} at {} ({timezone})", days.join(", "), at.format("%H:%M"))
            }
            Schedule::Cron {
                expression, timezone, ..
            } => write!(f, "cron `{expression}` ({timezone})"),
            Schedule::After(mappings) => write!(f, "after {}", mappings.join(", ")),
            Schedule::AfterDbt { jobs } if jobs.is_empty() => f.write_str("after dbt builds its models"),
            Schedule::AfterDbt { jobs } => write!(f, "after dbt job {}", jobs.join(" or ")),
        }
    }
}

fn humantime_like(interval: Duration) -> String {
    let minutes = interval.as_secs() / 60;
    match minutes {
        m if m % 1440 == 0 => format!("{}d", m / 1440),
        m if m % 60 == 0 => format!("{}h", m / 60),
        m => format!("{m}m"),
    }
}

/// Parses `15m`, `2h`, `1d`, `90s` (and combinations like `1h30m`).
fn parse_interval(text: &str) -> Result<Duration, String> {
    let bad = || format!("`{text}` is not an interval; write e.g. 15m, 2h or 1d");
    let mut total = 0u64;
    let mut number = String::new();
    for c in text.trim().chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: u64 = number.parse().map_err(|_| bad())?;
        number.clear();
        total += n * match c {
            's' => 1,
            'm' => 60,
            'h' => 3600,
            'd' => 86_400,
            _ => return Err(bad()),
        };
    }
    if !number.is_empty() || total == 0 {
        return Err(bad());
    }
    Ok(Duration::from_secs(total))
}

fn parse_timezone(name: Option<&str>) -> Result<Tz, String> {
    match name {
        None => Ok(Tz::UTC),
        Some(name) => Tz::from_str(name)
            .map_err(|_| format!("`{name}` is not a time zone; use an IANA name like Europe/Paris or UTC")),
    }
}

fn parse_weekday(name: &str) -> Result<Weekday, String> {
    let lower = name.trim().to_ascii_lowercase();
    let day = match lower.get(..3) {
        Some("mon") => Weekday::Mon,
        Some("tue") => Weekday::Tue,
        Some("wed") => Weekday::Wed,
        Some("thu") => Weekday::Thu,
        Some("fri") => Weekday::Fri,
        Some("sat") => Weekday::Sat,
        Some("sun") => Weekday::Sun,
        _ => {
            return Err(format!(
                "`{name}` is not a weekday; write mon, tue, wed, thu, fri, sat or sun"
            ));
        }
    };
    Ok(day)
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct Fields {
            every: Option<String>,
            days: Option<Vec<String>>,
            at: Option<String>,
            cron: Option<String>,
            timezone: Option<String>,
            after: Option<Vec<String>>,
            after_dbt: Option<AfterDbt>,
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum AfterDbt {
            Flag(bool),
            Jobs(DbtJobs),
        }
        #[derive(Deserialize)]
        #[serde(deny_unknown_fields)]
        struct DbtJobs {
            #[serde(default)]
            jobs: Vec<JobRef>,
        }
        /// A dbt Cloud job id (a number) or name.
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum JobRef {
            Id(u64),
            Name(String),
        }
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Word(String),
            Fields(Fields),
        }
        let shapes = "`schedule` is `manual`, `{every: 15m}`, `{days: [mon, thu], at: \"09:00\", timezone: Europe/Paris}` `{cron: \"0 9 * * 1-5\", timezone: UTC}`, `{after: [other_mapping]}`, `{after_dbt: true}` or `{after_dbt: {jobs: [dbt_cloud_job_id]}}`";
        let raw = Raw::deserialize(deserializer).map_err(|_| de::Error::custom(shapes))?;
        let fields = match raw {
            Raw::Word(word) if word == "manual" => return Ok(Schedule::Manual),
            Raw::Word(_) => return Err(de::Error::custom(shapes)),
            Raw::Fields(fields) => fields,
        };
        let clock = fields.every.is_some()
            || fields.days.is_some()
            || fields.at.is_some()
            || fields.cron.is_some()
            || fields.timezone.is_some();
        if let Some(after_dbt) = fields.after_dbt {
            if clock || fields.after.is_some() {
                return Err(de::Error::custom(
                    "`after_dbt:` stands alone: a mapping runs after dbt, after other mappings, or on a clock",
                ));
            }
            let jobs = match after_dbt {
                AfterDbt::Flag(true) => Vec::new(),
                AfterDbt::Flag(false) => {
                    return Err(de::Error::custom(
                        "`after_dbt: false` says nothing; write `manual` for a mapping that runs on demand",
                    ));
                }
                AfterDbt::Jobs(DbtJobs { jobs }) => jobs
                    .into_iter()
                    .map(|job| match job {
                        JobRef::Id(id) => Ok(id.to_string()),
                        JobRef::Name(name) if !name.trim().is_empty() => Ok(name.trim().to_string()),
                        JobRef::Name(_) => Err(de::Error::custom("`after_dbt.jobs` has an empty job name")),
                    })
                    .collect::<Result<_, _>>()?,
            };
            return Ok(Schedule::AfterDbt { jobs });
        }
        if let Some(after) = fields.after {
            if fields.every.is_some()
                || fields.days.is_some()
                || fields.at.is_some()
                || fields.cron.is_some()
                || fields.timezone.is_some()
            {
                return Err(de::Error::custom(
                    "`after:` stands alone: a mapping runs after others, or on a clock, not both",
                ));
            }
            if after.is_empty() || after.iter().any(|m| m.trim().is_empty()) {
                return Err(de::Error::custom("`after:` lists the mappings to run after"));
            }
            return Ok(Schedule::After(after));
        }
        match (fields.every, fields.days, fields.at, fields.cron) {
            (Some(every), None, None, None) => {
                if fields.timezone.is_some() {
                    return Err(de::Error::custom("`every:` schedules take no `timezone`"));
                }
                let interval = parse_interval(&every).map_err(de::Error::custom)?;
                if interval < MIN_INTERVAL {
                    return Err(de::Error::custom(format!(
                        "`every: {every}` is shorter than the 1 minute minimum"
                    )));
                }
                Ok(Schedule::Every(interval))
            }
            (None, days, Some(at), None) => {
                let at = NaiveTime::parse_from_str(&at, "%H:%M").map_err(|_| {
                    de::Error::custom(format!("`at: {at}` is not a time; write HH:MM, e.g. \"09:00\""))
                })?;
                let days = match days {
                    None => vec![
                        Weekday::Mon,
                        Weekday::Tue,
                        Weekday::Wed,
                        Weekday::Thu,
                        Weekday::Fri,
                        Weekday::Sat,
                        Weekday::Sun,
                    ],
                    Some(days) if days.is_empty() => return Err(de::Error::custom("`days` is empty")),
                    Some(days) => days
                        .iter()
                        .map(|d| parse_weekday(d))
                        .collect::<Result<_, _>>()
                        .map_err(de::Error::custom)?,
                };
                let timezone = parse_timezone(fields.timezone.as_deref()).map_err(de::Error::custom)?;
                Ok(Schedule::DaysAt { days, at, timezone })
            }
            (None, None, None, Some(expression)) => {
                let cron = croner::Cron::from_str(&expression).map_err(|e| {
                    de::Error::custom(format!("`cron: {expression}` is not a cron expression: {e}"))
                })?;
                let timezone = parse_timezone(fields.timezone.as_deref()).map_err(de::Error::custom)?;
                Ok(Schedule::Cron {
                    cron: Box::new(cron),
                    expression,
                    timezone,
                })
            }
            (None, Some(_), None, None) => Err(de::Error::custom("`days` needs `at`, the time of day")),
            _ => Err(de::Error::custom(shapes)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<Schedule, String> {
        serde_norway::from_str(yaml).map_err(|e| e.to_string())
    }

    fn utc(text: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(text).unwrap().with_timezone(&Utc)
    }

    #[test]
    fn schedules_parse_and_bad_ones_say_why() {
        assert_eq!(parse("manual").unwrap(), Schedule::Manual);
        assert_eq!(
            parse("{after: [a, b]}").unwrap(),
            Schedule::After(vec!["a".into(), "b".into()])
        );
        assert!(
            parse("{after: [a], every: 15m}")
                .unwrap_err()
                .contains("stands alone")
        );
        assert!(parse("{after: []}").unwrap_err().contains("lists the mappings"));
        assert_eq!(
            parse("{after_dbt: true}").unwrap(),
            Schedule::AfterDbt { jobs: Vec::new() }
        );
        assert_eq!(
            parse("{after_dbt: {jobs: [70403, \"Nightly build\"]}}").unwrap(),
            Schedule::AfterDbt {
                jobs: vec!["70403".into(), "Nightly build".into()]
            }
        );
        assert_eq!(
            parse("{after_dbt: {}}").unwrap(),
            Schedule::AfterDbt { jobs: Vec::new() }
        );
        assert!(
            parse("{after_dbt: true, every: 1h}")
                .unwrap_err()
                .contains("stands alone")
        );
        assert!(parse("{after_dbt: false}").unwrap_err().contains("manual"));
        assert!(parse("{after_dbt: {job: [1]}}").is_err());
        assert_eq!(
            parse("{after_dbt: {jobs: [1, 2]}}").unwrap().to_string(),
            "after dbt job 1 or 2"
        );
        assert_eq!(
            parse("{every: 15m}").unwrap(),
            Schedule::Every(Duration::from_secs(900))
        );
        assert_eq!(
            parse("{every: 1h30m}").unwrap(),
            Schedule::Every(Duration::from_secs(5400))
        );
        assert!(parse("{every: 30s}").unwrap_err().contains("1 minute minimum"));
        assert!(parse("{every: soon}").unwrap_err().contains("not an interval"));
        assert!(
            parse("{days: [mon], at: \"25:00\"}")
                .unwrap_err()
                .contains("not a time")
        );
        assert!(
            parse("{days: [funday], at: \"09:00\"}")
                .unwrap_err()
                .contains("not a weekday")
        );
        assert!(
            parse("{at: \"09:00\", timezone: Mars/Olympus}")
                .unwrap_err()
                .contains("not a time zone")
        );
        assert!(
            parse("{cron: \"61 * * * *\"}")
                .unwrap_err()
                .contains("not a cron expression")
        );
        assert!(parse("hourly").unwrap_err().contains("`schedule` is"));
        assert!(parse("{days: [mon]}").unwrap_err().contains("needs `at`"));
    }

    #[test]
    fn intervals_anchor_on_the_previous_run() {
        let every = parse("{every: 15m}").unwrap();
        let now = utc("2026-11-22T10:00:00Z");
        assert_eq!(
            every.next_after(now, None),
            Some(now),
            "the first run is due at once"
        );
        assert_eq!(
            every.next_after(now, Some(utc("2026-11-22T09:50:00Z"))),
            Some(utc("2026-11-22T10:05:00Z"))
        );
        // Missed while down: due now, not replayed.
        assert_eq!(
            every.next_after(now, Some(utc("2026-11-22T06:00:00Z"))),
            Some(now)
        );
        assert_eq!(parse("manual").unwrap().next_after(now, None), None);
    }

    #[test]
    fn days_and_times_follow_the_time_zone() {
        let schedule = parse("{days: [mon, thu], at: \"09:00\", timezone: Europe/Paris}").unwrap();
        // Sunday 2026-11-22 10:00 UTC: next is Monday 09:00 Paris (CET, UTC+1).
        let times = schedule.upcoming(utc("2026-11-22T10:00:00Z"), None, 3);
        assert_eq!(
            times,
            [
                utc("2026-11-23T08:00:00Z"),
                utc("2026-11-26T08:00:00Z"),
                utc("2026-11-30T08:00:00Z")
            ]
        );
        // In summer Paris is UTC+2.
        assert_eq!(
            schedule.next_after(utc("2026-07-01T00:00:00Z"), None),
            Some(utc("2026-07-02T07:00:00Z"))
        );
    }

    #[test]
    fn daylight_saving_gaps_and_overlaps_fire_once() {
        // 2026-03-08: New York clocks jump 02:00 -> 03:00; 02:30 does not exist that day.
        let spring = parse("{at: \"02:30\", timezone: America/New_York}").unwrap();
        let times = spring.upcoming(utc("2026-03-07T12:00:00Z"), None, 3);
        assert_eq!(
            times,
            [
                utc("2026-03-08T07:30:00Z"), // 03:30 EDT, an hour after the missing 02:30
                utc("2026-03-09T06:30:00Z"), // 02:30 EDT
                utc("2026-03-10T06:30:00Z"),
            ]
        );
        // 2026-11-01: clocks go back 02:00 -> 01:00; 01:30 happens twice, fires once.
        let fall = parse("{at: \"01:30\", timezone: America/New_York}").unwrap();
        let times = fall.upcoming(utc("2026-10-31T12:00:00Z"), None, 2);
        assert_eq!(times, [utc("2026-11-01T05:30:00Z"), utc("2026-11-02T06:30:00Z")]);
    }

    #[test]
    fn cron_expressions_run_in_their_time_zone() {
        let cron = parse("{cron: \"0 9 * * 1-5\", timezone: Asia/Tokyo}").unwrap();
        // Sunday 2026-11-22 10:00 UTC = 19:00 Tokyo; next: Monday 09:00 Tokyo = 00:00 UTC.
        assert_eq!(
            cron.next_after(utc("2026-11-22T10:00:00Z"), None),
            Some(utc("2026-11-23T00:00:00Z"))
        );
        let hourly = parse("{cron: \"@hourly\"}").unwrap();
        assert_eq!(
            hourly.upcoming(utc("2026-11-22T10:15:00Z"), None, 2),
            [utc("2026-11-22T11:00:00Z"), utc("2026-11-22T12:00:00Z")]
        );
        assert_eq!(cron.to_string(), "cron `0 9 * * 1-5` (Asia/Tokyo)");
    }
}
