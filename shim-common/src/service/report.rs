//! What the shim is doing, in a few lines: what `SIGUSR1` writes to the shim log.

use super::*;

impl<B: Backend> TaskService<B> {
    /// A report of the service's state: a summary line, then one line per container and
    /// sandbox. It takes one lock at a time, so it never deadlocks with a request.
    pub fn reporter(&self) -> Box<dyn Fn() -> Vec<String> + Send + Sync> {
        let inner = self.inner.clone();
        Box::new(move || inner.report())
    }
}

impl<B: Backend> Inner<B> {
    #[cold]
    fn report(&self) -> Vec<String> {
        let (cells, creating, joined, sandboxes, closing) = {
            let t = lock(&self.containers);
            let mut cells: Vec<(String, Arc<Cell<B::Container>>)> = t
                .cells
                .iter()
                .map(|(id, c)| (id.clone(), c.clone()))
                .collect();
            cells.sort_by(|a, b| a.0.cmp(&b.0));
            let mut sandboxes: Vec<String> = t.sandboxes.keys().cloned().collect();
            sandboxes.sort();
            let creating: Vec<String> = t.creating.iter().cloned().collect();
            (cells, creating, t.joined.len(), sandboxes, t.closing)
        };
        let mut lines = vec![format!(
            "{} containers ({} being created, {joined} announced by start), {} sandboxes{}",
            cells.len(),
            creating.len(),
            sandboxes.len(),
            if closing { "; shutting down" } else { "" },
        )];
        for (id, cell) in &cells {
            let queued = lock(&cell.exits).queue.len();
            let c = lock(&cell.state);
            let mut line = format!(
                "container {id}: init pid {} {}",
                c.init.pid,
                c.init.life.describe()
            );
            let mut execs: Vec<(&String, &Proc)> = c.execs.iter().collect();
            execs.sort_by(|a, b| a.0.cmp(b.0));
            for (exec_id, p) in execs {
                line.push_str(&format!(
                    "; exec {exec_id} pid {} {}",
                    p.pid,
                    p.life.describe()
                ));
            }
            line.push_str(&format!(
                "; {} waits pending; {queued} exits queued",
                c.waiters.len()
            ));
            if c.deleted {
                line.push_str("; deleted");
            }
            lines.push(line);
        }
        for id in &creating {
            lines.push(format!("container {id}: being created"));
        }
        for id in &sandboxes {
            lines.push(format!("sandbox {id}"));
        }
        lines
    }
}
