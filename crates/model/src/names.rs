//! Names of the objects cloak generates. Kubernetes names are DNS subdomains (at most 253
//! characters); a name that would be longer keeps a readable prefix and ends in a hash of the
//! whole, so two long inputs never collide by truncation.

/// Longest object name the API server accepts (DNS-1123 subdomain).
pub const MAX_NAME: usize = 253;

/// `parts` joined by `-`, shortened with a hash suffix when longer than [`MAX_NAME`].
pub fn join(parts: &[&str]) -> String {
    let full = parts.join("-");
    if full.len() <= MAX_NAME {
        return full;
    }
    let hash = format!("{:016x}", fnv1a(full.as_bytes()));
    // 253 = prefix + "-" + 16 hex digits
    let mut prefix: String = full.chars().take(MAX_NAME - 17).collect();
    while prefix.ends_with(['-', '.']) {
        prefix.pop();
    }
    format!("{prefix}-{hash}")
}

/// Whether `name` is a DNS label (RFC 1123: 1-63 lowercase letters, digits and `-`, neither
/// first nor last a `-`): what can go into a key, a rule's comment or a file name as it is.
pub fn is_dns_label(name: &str) -> bool {
    (1..=63).contains(&name.len())
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-')
        && !name.ends_with('-')
}

/// The reservation of slot `slot` of provider `provider` (a `Lease` in the provider's namespace).
pub fn slot_lease(provider: &str, slot: u32) -> String {
    join(&["cloak-slot", provider, &slot.to_string()])
}

/// The copy of a provider's credentials in a mask's namespace.
pub fn mask_secret(mask: &str) -> String {
    join(&[mask, "vpn-credentials"])
}

/// The operator's copy of a provider's server list fetched from a URL (a ConfigMap).
pub fn server_list(provider: &str) -> String {
    join(&[provider, "server-list"])
}

/// The mask a provider's verification leases its slot through, and the verification pod.
pub fn verification(provider: &str) -> String {
    join(&[provider, "verify"])
}

/// FNV-1a, 64 bit: stable across builds and platforms, unlike `std`'s hasher.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_are_joined_as_they_are() {
        assert_eq!(slot_lease("mullvad", 3), "cloak-slot-mullvad-3");
        assert_eq!(mask_secret("dl"), "dl-vpn-credentials");
    }

    #[test]
    fn long_names_fit_and_stay_distinct() {
        let a = "a".repeat(250);
        let (x, y) = (slot_lease(&a, 1), slot_lease(&a, 2));
        assert!(x.len() <= MAX_NAME && y.len() <= MAX_NAME);
        assert_ne!(x, y);
        assert!(x.starts_with("cloak-slot-aaa"));
    }

    #[test]
    fn dns_labels_are_told_from_what_could_break_a_key_or_a_rule() {
        for good in ["web", "a", "torrent-1", &"x".repeat(63)] {
            assert!(is_dns_label(good), "{good}");
        }
        for bad in [
            "",
            "-a",
            "a-",
            "A",
            "a b",
            "a\"",
            "a\nflush ruleset",
            "a.b",
            &"x".repeat(64),
        ] {
            assert!(!is_dns_label(bad), "{bad:?}");
        }
    }
}
