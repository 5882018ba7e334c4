//! Writing an object's status, only when it changed: how both controllers write the status they
//! compute (an object that does not even deserialize is reported apart, by `report_invalid`).

use kube::{
    Api,
    api::{Patch, PatchParams},
};
use serde::Serialize;

/// Writes `status` as the object's status when it differs from `previous` (the status as read),
/// as one merge patch. A field `previous` had and `status` leaves out is sent as `null`, so the
/// patch removes it instead of leaving a stale value (an assignment the mask lost, say). With
/// `over_version`, the write succeeds only over that `resourceVersion` of the object (a conflict
/// otherwise). Returns whether it wrote.
pub(crate) async fn write_if_changed<K, S>(
    api: &Api<K>,
    name: &str,
    previous: &S,
    status: &S,
    over_version: Option<&str>,
) -> crate::Result<bool>
where
    K: Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    S: Serialize + PartialEq,
{
    if previous == status {
        return Ok(false);
    }
    let patch = merge_patch(previous, status, over_version)?;
    api.patch_status(name, &PatchParams::default(), &Patch::Merge(&patch))
        .await?;
    Ok(true)
}

/// Marks every key of `old` that `new` lacks as `null`, at any depth of nested objects, so
/// that a merge patch of `new` removes it (a merge patch leaves absent keys as they were).
/// Arrays are replaced whole by a merge patch and need nothing.
fn nulls_for_removed(old: &serde_json::Value, new: &mut serde_json::Value) {
    if let (serde_json::Value::Object(old), serde_json::Value::Object(new)) = (old, new) {
        for (key, old_value) in old {
            match new.get_mut(key) {
                None => {
                    new.insert(key.clone(), serde_json::Value::Null);
                }
                Some(new_value) => nulls_for_removed(old_value, new_value),
            }
        }
    }
}

/// The merge patch that turns `previous` into `status`.
fn merge_patch<S: Serialize>(
    previous: &S,
    status: &S,
    over_version: Option<&str>,
) -> serde_json::Result<serde_json::Value> {
    let mut value = serde_json::to_value(status)?;
    nulls_for_removed(&serde_json::to_value(previous)?, &mut value);
    let mut patch = serde_json::json!({ "status": value });
    if let Some(version) = over_version {
        patch["metadata"] = serde_json::json!({ "resourceVersion": version });
    }
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use cloak_api::{AssignedProvider, MaskPhase, VpnMaskStatus};

    use super::*;

    #[test]
    fn a_field_that_went_away_is_removed_and_the_version_is_a_precondition() {
        let held = VpnMaskStatus {
            phase: Some(MaskPhase::Ready),
            provider: Some(AssignedProvider {
                name: "p".into(),
                namespace: "vpn".into(),
                uid: "u".into(),
                slot: 0,
                secret: "s".into(),
            }),
            ..VpnMaskStatus::default()
        };
        let lost = VpnMaskStatus {
            phase: Some(MaskPhase::Waiting),
            ..VpnMaskStatus::default()
        };
        let patch = merge_patch(&held, &lost, Some("42")).unwrap();
        assert_eq!(patch["status"]["provider"], serde_json::Value::Null);
        assert!(
            patch["status"]
                .as_object()
                .unwrap()
                .contains_key("provider")
        );
        assert_eq!(patch["status"]["phase"], "Waiting");
        assert_eq!(patch["metadata"]["resourceVersion"], "42");
        let plain = merge_patch(&lost, &held, None).unwrap();
        assert_eq!(plain["status"]["provider"]["slot"], 0);
        assert!(plain.get("metadata").is_none());
    }

    #[test]
    fn a_nested_field_that_went_away_is_removed_too() {
        let list = |error: Option<&str>| cloak_api::VpnProviderStatus {
            server_list: Some(cloak_api::ServerListStatus {
                servers: 3,
                fetch_error: error.map(str::to_owned),
                ..cloak_api::ServerListStatus::default()
            }),
            ..cloak_api::VpnProviderStatus::default()
        };
        let patch = merge_patch(&list(Some("HTTP 500")), &list(None), None).unwrap();
        let written = &patch["status"]["serverList"];
        assert_eq!(written["servers"], 3);
        assert!(
            written.as_object().unwrap().contains_key("fetchError"),
            "{patch}"
        );
        assert_eq!(written["fetchError"], serde_json::Value::Null);
    }
}
