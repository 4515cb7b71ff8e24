//! Fault injection for reliability tests: latency, and the N-th matching request
//! answered with a 500, a 429 with Retry-After, a hang, or a dropped connection.
use std::sync::Mutex;
use std::time::Duration;

#[derive(Debug, Clone, PartialEq)]
pub enum FaultAction {
    /// Answer with this HTTP status and a Kubernetes `Status` body.
    Status(u16),
    /// 429 with `Retry-After: secs`.
    TooManyRequests { retry_after: u64 },
    /// Never answer (until the client gives up or the server stops).
    Hang,
    /// Close the connection without an answer.
    Drop,
    /// Answer normally after this long.
    Delay(Duration),
}

#[derive(Debug, Clone)]
pub struct FaultRule {
    pub method: Option<String>,
    pub path_contains: Option<String>,
    /// The first matching request this rule fires on (1-based).
    pub nth: u64,
    /// How many matching requests in a row, from `nth`, it fires on.
    pub times: u64,
    pub action: FaultAction,
    seen: u64,
    fired: u64,
}

impl FaultRule {
    /// Matches requests with this method (any if `None`) whose path contains `path`.
    pub fn on(method: Option<&str>, path: &str) -> Self {
        Self {
            method: method.map(str::to_string),
            path_contains: Some(path.to_string()),
            nth: 1,
            times: 1,
            action: FaultAction::Status(500),
            seen: 0,
            fired: 0,
        }
    }
    pub fn nth(mut self, n: u64) -> Self {
        self.nth = n.max(1);
        self
    }
    pub fn times(mut self, n: u64) -> Self {
        self.times = n;
        self
    }
    pub fn action(mut self, a: FaultAction) -> Self {
        self.action = a;
        self
    }
}

#[derive(Debug, Default)]
pub struct Faults {
    rules: Mutex<Vec<FaultRule>>,
    latency: Mutex<Duration>,
}

impl Faults {
    pub fn add(&self, rule: FaultRule) {
        self.rules.lock().unwrap().push(rule);
    }
    pub fn clear(&self) {
        self.rules.lock().unwrap().clear();
        *self.latency.lock().unwrap() = Duration::ZERO;
    }
    /// Added to every request.
    pub fn set_latency(&self, d: Duration) {
        *self.latency.lock().unwrap() = d;
    }
    pub fn latency(&self) -> Duration {
        *self.latency.lock().unwrap()
    }
    /// How many times rules have fired in total.
    pub fn fired(&self) -> u64 {
        self.rules.lock().unwrap().iter().map(|r| r.fired).sum()
    }

    pub(crate) fn check(&self, method: &str, path: &str) -> Option<FaultAction> {
        let mut rules = self.rules.lock().unwrap();
        let mut action = None;
        // Every matching rule counts the request, whichever fires, so each
        // rule's `nth` refers to its own sequence of matches.
        for r in rules.iter_mut() {
            if r.method
                .as_deref()
                .is_some_and(|m| !m.eq_ignore_ascii_case(method))
            {
                continue;
            }
            if r.path_contains
                .as_deref()
                .is_some_and(|p| !path.contains(p))
            {
                continue;
            }
            r.seen += 1;
            if action.is_none() && r.seen >= r.nth && r.seen < r.nth.saturating_add(r.times) {
                r.fired += 1;
                action = Some(r.action.clone());
            }
        }
        action
    }
}
