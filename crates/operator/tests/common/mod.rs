//! Helpers shared by the operator's integration test binaries.

#![allow(dead_code, clippy::unwrap_used, clippy::large_futures)] // each binary uses a subset

use kube::Client;

/// An operator instance running on the calling test's runtime.
pub(crate) struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<()>,
}

impl Running {
    /// Starts `cloak_operator::run` with `config`.
    pub(crate) fn start(client: Client, config: cloak_operator::Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            cloak_operator::run(client, config, async {
                let _ = stopped.await;
            })
            .await
            .unwrap();
        });
        Self { stop, task }
    }

    /// Stops the instance and waits until it has stopped.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap();
    }
}
