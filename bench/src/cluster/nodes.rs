//! The node processes: started as the harness's own `cluster-node` mode,
//! killed, stalled, resumed and told to leave, and asked for their counters.

use std::error::Error;
use std::process::Stdio;
use std::time::Duration;

use serde_json::Value;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::sync::mpsc;

use super::http_client::Connections;

type AnyError = Box<dyn Error + Send + Sync>;

/// A running node.
pub(crate) struct NodeProcess {
    pub(crate) name: String,
    /// Where it serves (`http://127.0.0.1:port`).
    pub(crate) address: String,
    child: tokio::process::Child,
    /// Dropped to tell the node to leave.
    stdin: Option<tokio::process::ChildStdin>,
    /// Its stdout, one JSON value a line.
    lines: mpsc::UnboundedReceiver<Value>,
}

impl NodeProcess {
    /// Starts node `name` on `url` and waits until it serves.
    pub(crate) async fn start(url: &str, name: &str, event_id_memory: usize) -> Result<Self, AnyError> {
        let mut child = tokio::process::Command::new(std::env::current_exe()?)
            .args(["cluster-node", "--database-url", url, "--node", name])
            .args(["--event-id-memory", &event_id_memory.to_string()])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()?;
        let stdin = child.stdin.take().ok_or("no stdin")?;
        let stdout = child.stdout.take().ok_or("no stdout")?;
        let (sender, mut lines) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut stdout = BufReader::new(stdout).lines();
            while let Ok(Some(line)) = stdout.next_line().await {
                if let Ok(value) = serde_json::from_str::<Value>(&line) {
                    if sender.send(value).is_err() {
                        return;
                    }
                }
            }
        });
        let ready = tokio::time::timeout(Duration::from_secs(60), lines.recv())
            .await
            .map_err(|_| format!("node {name} did not start within 60 s"))?
            .ok_or_else(|| format!("node {name} exited before it served"))?;
        let address = ready["ready"]
            .as_str()
            .ok_or_else(|| format!("node {name} said {ready}"))?
            .to_owned();
        Ok(Self {
            name: name.to_owned(),
            address,
            child,
            stdin: Some(stdin),
            lines,
        })
    }

    fn signal(&self, signal: i32) -> Result<(), AnyError> {
        let pid = self.child.id().ok_or("the node has exited")?;
        let pid = i32::try_from(pid)?;
        // SAFETY: kill(2) has no memory effects; the pid is our own child's,
        // not yet reaped (we hold its handle and have not waited on it).
        if unsafe { libc::kill(pid, signal) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error().into())
        }
    }

    /// SIGKILL, and waits for the process to be gone.
    pub(crate) async fn kill(mut self) -> Result<(), AnyError> {
        self.child.start_kill()?;
        self.child.wait().await?;
        Ok(())
    }

    /// SIGSTOP: the whole process stalls, its membership thread with it.
    pub(crate) fn stall(&self) -> Result<(), AnyError> {
        self.signal(libc::SIGSTOP)
    }

    /// SIGCONT.
    pub(crate) fn resume(&self) -> Result<(), AnyError> {
        self.signal(libc::SIGCONT)
    }

    /// SIGTERM: the node leaves the cluster gracefully and exits. Returns
    /// how long its `Cluster::leave` took, as it measured it.
    pub(crate) async fn terminate(self) -> Result<f64, AnyError> {
        self.signal(libc::SIGTERM)?;
        self.until_left().await
    }

    /// Closes the node's input: it leaves the cluster gracefully and exits.
    pub(crate) async fn close(mut self) -> Result<f64, AnyError> {
        drop(self.stdin.take());
        self.until_left().await
    }

    async fn until_left(mut self) -> Result<f64, AnyError> {
        let left = tokio::time::timeout(Duration::from_secs(30), self.lines.recv())
            .await
            .map_err(|_| format!("node {} did not leave within 30 s", self.name))?
            .ok_or_else(|| format!("node {} exited without leaving", self.name))?;
        if let Some(error) = left["error"].as_str() {
            return Err(format!("node {} could not leave: {error}", self.name).into());
        }
        tokio::time::timeout(Duration::from_secs(30), self.child.wait())
            .await
            .map_err(|_| format!("node {} did not exit within 30 s of leaving", self.name))??;
        left["left_seconds"]
            .as_f64()
            .ok_or_else(|| format!("node {} said {left}", self.name).into())
    }
}

/// A node's cluster counters (its `/stats`), or `None` when it does not answer within a second.
pub(crate) async fn stats(connections: &mut Connections, address: &str) -> Option<Value> {
    let asked = connections.send(address, "GET", "/stats", None);
    match tokio::time::timeout(Duration::from_secs(1), asked).await {
        Ok(Ok(response)) if response.status == 200 => serde_json::from_slice(&response.body).ok(),
        Ok(_) => None,
        Err(_) => {
            connections.clear();
            None
        }
    }
}
