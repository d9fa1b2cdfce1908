//! The runner's report: one [`Step`] per check.

/// One check of the run.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub ok: bool,
    pub detail: String,
}

/// Every check of a run, in order.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub steps: Vec<Step>,
}

impl Report {
    /// Records a check and returns whether it passed.
    pub fn check(&mut self, name: &str, result: Result<String, String>) -> bool {
        let (ok, detail) = match result {
            Ok(d) => (true, d),
            Err(d) => (false, d),
        };
        self.steps.push(Step {
            name: name.to_string(),
            ok,
            detail,
        });
        ok
    }

    pub fn passed(&self) -> bool {
        !self.steps.is_empty() && self.steps.iter().all(|s| s.ok)
    }

    pub fn failures(&self) -> Vec<&Step> {
        self.steps.iter().filter(|s| !s.ok).collect()
    }
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for s in &self.steps {
            writeln!(
                f,
                "{} {:<22} {}",
                if s.ok { "PASS" } else { "FAIL" },
                s.name,
                s.detail
            )?;
        }
        Ok(())
    }
}
