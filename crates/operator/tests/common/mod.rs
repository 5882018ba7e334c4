//! Helpers shared by the operator's integration test binaries.

#![allow(dead_code, clippy::unwrap_used, clippy::large_futures)] // each binary uses a subset

use k8s_openapi::{ByteString, api::core::v1::Secret};
use kube::{
    Api, Client,
    api::{ObjectMeta, Patch, PatchParams},
};

/// An operator instance running on the calling test's runtime.
pub(crate) struct Running {
    stop: tokio::sync::oneshot::Sender<()>,
    task: tokio::task::JoinHandle<cloak_operator::Result<()>>,
}

impl Running {
    /// Starts `cloak_operator::run` with `config`.
    pub(crate) fn start(client: Client, config: cloak_operator::Config) -> Self {
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(cloak_operator::run(client, config, async {
            let _ = stopped.await;
        }));
        Self { stop, task }
    }

    /// Whether the instance has ended by itself.
    pub(crate) fn finished(&self) -> bool {
        self.task.is_finished()
    }

    /// How an instance that ended by itself ended.
    pub(crate) async fn outcome(self) -> cloak_operator::Result<()> {
        self.task.await.unwrap()
    }

    /// Stops the instance and waits until it has stopped; it must not have failed.
    pub(crate) async fn stop(self) {
        let _ = self.stop.send(());
        self.task.await.unwrap().unwrap();
    }
}

/// Secret `creds` in `ns` with gluetun-style credentials (enough for `verify.skip` providers).
pub(crate) async fn credentials_secret(client: &Client, ns: &str) {
    let secret = Secret {
        metadata: ObjectMeta {
            name: Some("creds".into()),
            ..ObjectMeta::default()
        },
        data: Some([("VPN_SERVICE_PROVIDER".to_owned(), ByteString(b"x".to_vec()))].into()),
        ..Secret::default()
    };
    Api::<Secret>::namespaced(client.clone(), ns)
        .patch("creds", &PatchParams::apply("test"), &Patch::Apply(&secret))
        .await
        .unwrap();
}
