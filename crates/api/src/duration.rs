//! [`GoDuration`]: a duration written as Go writes it (`90s`, `1m30s`, `24h`), the form seed 000's
//! users already have in their manifests. Parsed once when the object is read, so code above this
//! crate only ever sees a valid [`std::time::Duration`].

use std::{fmt, str::FromStr, time::Duration};

use schemars::JsonSchema;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// The API server's check of the same grammar [`GoDuration::from_str`] accepts, so a bad value is
/// refused at `kubectl apply` time instead of surfacing later in a controller.
pub(crate) const PATTERN: &str = r"^(0|([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+)$";

/// A non-negative duration in Go's `time.ParseDuration` syntax: one or more `<number><unit>`
/// terms, units `ns`, `us`/`µs`, `ms`, `s`, `m`, `h`; or `0`.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct GoDuration {
    text: String,
    value: Duration,
}

/// Why a string is not a [`GoDuration`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    #[error("empty duration")]
    Empty,
    #[error("invalid duration {0:?}: expected terms like 90s, 1m30s or 24h")]
    Syntax(String),
    #[error("unknown unit {unit:?} in duration {text:?} (use ns, us, ms, s, m or h)")]
    Unit { text: String, unit: String },
    #[error("duration {0:?} is too large")]
    Overflow(String),
}

impl GoDuration {
    /// The parsed value.
    pub fn get(&self) -> Duration {
        self.value
    }

    /// The text as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }
}

impl FromStr for GoDuration {
    type Err = DurationError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        if text.is_empty() {
            return Err(DurationError::Empty);
        }
        if text == "0" {
            return Ok(Self {
                text: text.to_owned(),
                value: Duration::ZERO,
            });
        }
        let syntax = || DurationError::Syntax(text.to_owned());
        let overflow = || DurationError::Overflow(text.to_owned());
        let mut rest = text;
        let mut total_nanos: u128 = 0;
        while !rest.is_empty() {
            let number_len = rest
                .find(|c: char| !(c.is_ascii_digit() || c == '.'))
                .ok_or_else(syntax)?;
            let (number, tail) = rest.split_at(number_len);
            let unit_len = tail
                .find(|c: char| c.is_ascii_digit() || c == '.')
                .unwrap_or(tail.len());
            let (unit, next) = tail.split_at(unit_len);
            let scale: u128 = match unit {
                "ns" => 1,
                "us" | "µs" => 1_000,
                "ms" => 1_000_000,
                "s" => 1_000_000_000,
                "m" => 60_000_000_000,
                "h" => 3_600_000_000_000,
                "" => return Err(syntax()),
                other => {
                    return Err(DurationError::Unit {
                        text: text.to_owned(),
                        unit: other.to_owned(),
                    });
                }
            };
            let (whole, frac) = number.split_once('.').unwrap_or((number, ""));
            if whole.is_empty() || (number.contains('.') && frac.is_empty()) {
                return Err(syntax());
            }
            let whole: u128 = whole.parse().map_err(|_| overflow())?;
            let mut nanos = whole.checked_mul(scale).ok_or_else(overflow)?;
            // Fractions finer than a nanosecond are dropped, as Go does.
            let mut place = scale;
            for digit in frac.bytes() {
                place /= 10;
                nanos += u128::from(digit - b'0') * place;
            }
            total_nanos = total_nanos.checked_add(nanos).ok_or_else(overflow)?;
            rest = next;
        }
        let secs = u64::try_from(total_nanos / 1_000_000_000).map_err(|_| overflow())?;
        let subsec = u32::try_from(total_nanos % 1_000_000_000).map_err(|_| overflow())?;
        Ok(Self {
            text: text.to_owned(),
            value: Duration::new(secs, subsec),
        })
    }
}

impl fmt::Display for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for GoDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GoDuration({})", self.text)
    }
}

impl Serialize for GoDuration {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(&self.text)
    }
}

impl<'de> Deserialize<'de> for GoDuration {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

impl JsonSchema for GoDuration {
    fn schema_name() -> std::borrow::Cow<'static, str> {
        "GoDuration".into()
    }

    fn inline_schema() -> bool {
        true
    }

    fn json_schema(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
        schemars::json_schema!({
            "type": "string",
            "pattern": PATTERN,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Duration, DurationError> {
        text.parse::<GoDuration>().map(|d| d.get())
    }

    #[test]
    fn go_style_durations_parse_to_their_value() {
        assert_eq!(parse("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("1m30s"), Ok(Duration::from_secs(90)));
        assert_eq!(parse("24h"), Ok(Duration::from_hours(24)));
        assert_eq!(parse("1.5s"), Ok(Duration::from_millis(1500)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse("3us"), Ok(Duration::from_micros(3)));
        assert_eq!(parse("3µs"), Ok(Duration::from_micros(3)));
        assert_eq!(parse("0"), Ok(Duration::ZERO));
    }

    #[test]
    fn malformed_durations_are_refused_with_the_reason() {
        assert_eq!(parse(""), Err(DurationError::Empty));
        assert!(matches!(parse("90"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("s"), Err(DurationError::Syntax(_))));
        assert!(matches!(
            parse("-1s"),
            Err(DurationError::Unit { .. } | DurationError::Syntax(_))
        ));
        assert!(matches!(parse("1.s"), Err(DurationError::Syntax(_))));
        assert!(matches!(parse("5d"), Err(DurationError::Unit { unit, .. }) if unit == "d"));
        assert!(matches!(
            parse("99999999999999999999999h"),
            Err(DurationError::Overflow(_))
        ));
    }

    #[test]
    fn serialization_keeps_the_text_as_written() {
        let d: GoDuration = serde_json::from_str("\"1m30s\"").unwrap();
        assert_eq!(serde_json::to_string(&d).unwrap(), "\"1m30s\"");
        assert!(serde_json::from_str::<GoDuration>("\"soon\"").is_err());
    }
}
