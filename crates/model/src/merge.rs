//! JSON merge patch (RFC 7386): objects merge key by key, `null` removes a key, anything else
//! (arrays included) replaces. This is what "merged onto the generated pod" means for overrides.

use serde_json::Value;

/// Applies `patch` onto `target` in place.
pub fn merge(target: &mut Value, patch: &Value) {
    let Value::Object(patch) = patch else {
        *target = patch.clone();
        return;
    };
    if !target.is_object() {
        *target = Value::Object(serde_json::Map::new());
    }
    if let Value::Object(target) = target {
        for (key, value) in patch {
            if value.is_null() {
                target.remove(key);
            } else {
                merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn objects_merge_arrays_replace_and_null_removes() {
        let mut target = json!({"a": {"b": 1, "c": 2}, "list": [1, 2], "gone": true});
        merge(
            &mut target,
            &json!({"a": {"c": 3, "d": 4}, "list": [9], "gone": null}),
        );
        assert_eq!(target, json!({"a": {"b": 1, "c": 3, "d": 4}, "list": [9]}));
    }
}
