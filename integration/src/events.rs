//! Recording containerd's event stream (`ctr events`) during a test.

use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use crate::checks::wait_until;
use crate::containerd::{Containerd, CTR_BINARY};

/// One event as `ctr events` prints it: `<time> <namespace> <topic> <json>`.
#[derive(Debug, Clone)]
pub struct Event {
    pub topic: String,
    pub body: serde_json::Value,
}

impl Event {
    /// The container the event is about, for task events.
    pub fn container(&self) -> &str {
        self.body["container_id"].as_str().unwrap_or_default()
    }
}

/// A running `ctr events` subscription; stops on drop.
pub struct EventLog {
    child: Child,
    events: Arc<Mutex<Vec<Event>>>,
}

impl EventLog {
    /// Subscribes to every event of `c`'s containerd (all namespaces).
    pub fn start(c: &Containerd) -> EventLog {
        let mut child = Command::new(CTR_BINARY)
            .arg("--address")
            .arg(c.address())
            .arg("events")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn ctr events: {e}"));
        let events = Arc::new(Mutex::new(Vec::new()));
        let out = child
            .stdout
            .take()
            .unwrap_or_else(|| panic!("ctr events has no stdout"));
        let sink = events.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(out).lines().map_while(Result::ok) {
                if let Some(e) = parse(&line) {
                    sink.lock().unwrap_or_else(|p| p.into_inner()).push(e);
                }
            }
        });
        let log = EventLog { child, events };
        // ctr subscribes asynchronously: it is listening once a throw-away container's
        // events come through (the busybox image must be imported).
        let probe = crate::unique_id("probe");
        c.ctr_ok(&["run", "--rm", crate::BUSYBOX_REF, &probe, "true"]);
        assert!(
            log.wait_for(&probe, "/tasks/delete"),
            "ctr events saw nothing"
        );
        log
    }

    /// Positions of `topic` among the events about `container`.
    pub fn positions(&self, container: &str, topic: &str) -> Vec<usize> {
        let topics = self.topics(container);
        (0..topics.len()).filter(|&i| topics[i] == topic).collect()
    }

    /// Events about `container`, in arrival order.
    pub fn for_container(&self, container: &str) -> Vec<Event> {
        self.events
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter(|e| e.container() == container)
            .cloned()
            .collect()
    }

    /// Topics about `container`, in arrival order.
    pub fn topics(&self, container: &str) -> Vec<String> {
        self.for_container(container)
            .into_iter()
            .map(|e| e.topic)
            .collect()
    }

    /// Asserts that `container` (whose init the OOM killer took) got exactly one `TaskOOM`
    /// and one `TaskExit`, the OOM first, once its delete event has arrived.
    pub fn assert_oom_before_exit(&self, container: &str) {
        let all = || self.for_container(container);
        assert!(
            wait_until(Duration::from_secs(20), || !self
                .positions(container, "/tasks/delete")
                .is_empty()),
            "no delete event: {:#?}",
            all()
        );
        let ooms = self.positions(container, "/tasks/oom");
        let exits = self.positions(container, "/tasks/exit");
        assert_eq!(ooms.len(), 1, "one kill, one event: {:#?}", all());
        assert_eq!(exits.len(), 1, "{:#?}", all());
        assert!(ooms[0] < exits[0], "OOM after exit: {:#?}", all());
    }

    /// Waits until an event with `topic` about `container` arrived.
    pub fn wait_for(&self, container: &str, topic: &str) -> bool {
        wait_until(Duration::from_secs(20), || {
            self.topics(container).iter().any(|t| t == topic)
        })
    }
}

impl Drop for EventLog {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn parse(line: &str) -> Option<Event> {
    // "2026-11-22 22:00:00.1 +0000 UTC shimtest /tasks/exit {...}"
    let start = line.find(" /")? + 1;
    let rest = &line[start..];
    let (topic, json) = rest.split_once(' ').unwrap_or((rest, "{}"));
    Some(Event {
        topic: topic.to_string(),
        body: serde_json::from_str(json).unwrap_or(serde_json::Value::Null),
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn parses_ctr_event_lines() {
        let e = super::parse(
            r#"2026-11-22 22:00:00.123 +0000 UTC shimtest /tasks/exit {"container_id":"c1","id":"c1","pid":7,"exit_status":3}"#,
        )
        .unwrap();
        assert_eq!((e.topic.as_str(), e.container()), ("/tasks/exit", "c1"));
        assert_eq!(e.body["exit_status"], 3);
    }
}
