//! Personal data the ad platforms take only hashed: a mapped field with `as: sha256_email`
//! (or `sha256_phone`, `sha256_name`, ...) is normalised as the platforms ask (trimmed, lower
//! case, a phone in E.164, a date of birth as `YYYYMMDD`) and sent as the lowercase hex SHA-256
//! of that; the raw value never leaves sluice. A value that cannot be normalised (an email with
//! no `@`, a phone without its country code) fails its record, naming the field, instead of
//! sending a hash that matches no one.
//!
//! The rules follow Meta's customer information parameters and Google's Customer Match
//! formatting guide; where they differ the format says which it follows (`sha256_phone` is
//! E.164 with `+`, as Google and TikTok hash it; `sha256_phone_digits` the same digits without
//! `+`, as Meta and Snapchat do). A value that already is a SHA-256 hex digest is sent as it
//! is, so a warehouse that hashes for itself is not hashed twice.

use crate::destination::ValueFormat;

/// Which normalisation a hashed format applies.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pii {
    /// Trimmed and lower case (an external id, anything else).
    Plain,
    Email,
    /// An email address as Google matches it: a Gmail address without dots or `+tag` in its
    /// local part.
    GoogleEmail,
    /// E.164: `+` and 8 to 15 digits.
    Phone,
    /// E.164 digits without `+`.
    PhoneDigits,
    /// Lower case, punctuation removed (letters keep their accents).
    Name,
    /// Lower case letters only: no spaces, digits or punctuation.
    City,
    /// Lower case letters only (a US state's two-letter code, or a region's name).
    State,
    /// Lower case, no spaces; a US ZIP+4 keeps its first five digits.
    Zip,
    /// ISO 3166-1 alpha-2, lower case.
    Country,
    /// `f` or `m`.
    Gender,
    /// `YYYYMMDD`.
    DateOfBirth,
}

impl Pii {
    /// The normalisation of a hashed `as:` format; `None` for formats that do not hash.
    pub fn of(format: ValueFormat) -> Option<Self> {
        Some(match format {
            ValueFormat::Sha256 => Pii::Plain,
            ValueFormat::Sha256Email => Pii::Email,
            ValueFormat::Sha256EmailGoogle => Pii::GoogleEmail,
            ValueFormat::Sha256Phone => Pii::Phone,
            ValueFormat::Sha256PhoneDigits => Pii::PhoneDigits,
            ValueFormat::Sha256Name => Pii::Name,
            ValueFormat::Sha256City => Pii::City,
            ValueFormat::Sha256State => Pii::State,
            ValueFormat::Sha256Zip => Pii::Zip,
            ValueFormat::Sha256Country => Pii::Country,
            ValueFormat::Sha256Gender => Pii::Gender,
            ValueFormat::Sha256DateOfBirth => Pii::DateOfBirth,
            ValueFormat::Json
            | ValueFormat::String
            | ValueFormat::UnixMs
            | ValueFormat::UnixSeconds
            | ValueFormat::Rfc3339 => {
                return None;
            }
        })
    }

    /// `value` as the platforms hash it; `Err` says why it cannot be (the value itself is
    /// never quoted: it is personal data).
    pub fn normalize(self, value: &str) -> Result<String, String> {
        let trimmed = value.trim();
        if trimmed.is_empty() {
            return Err("is empty".into());
        }
        let lower = trimmed.to_lowercase();
        match self {
            Pii::Plain => Ok(lower),
            Pii::Email | Pii::GoogleEmail => {
                let lower: String = lower.chars().filter(|c| !c.is_whitespace()).collect();
                match lower.split_once('@') {
                    Some((local, domain))
                        if !local.is_empty() && domain.contains('.') && !domain.contains('@') =>
                    {
                        if self == Pii::GoogleEmail && matches!(domain, "gmail.com" | "googlemail.com") {
                            // Gmail ignores dots and delivers `+tag` addresses to the same box.
                            let local = local.split('+').next().unwrap_or_default().replace('.', "");
                            if local.is_empty() {
                                return Err("is not an email address".into());
                            }
                            return Ok(format!("{local}@{domain}"));
                        }
                        Ok(lower)
                    }
                    _ => Err("is not an email address".into()),
                }
            }
            Pii::Phone | Pii::PhoneDigits => {
                let international = trimmed.starts_with('+') || trimmed.starts_with("00");
                let mut digits: String = trimmed.chars().filter(char::is_ascii_digit).collect();
                if trimmed.starts_with("00") {
                    digits.drain(..2);
                }
                if trimmed.chars().any(|c| c.is_alphabetic()) {
                    return Err("is not a phone number (it has letters)".into());
                }
                // A number written without `+` is taken to start with its country code, as the
                // platforms ask; a leading 0 (a national trunk prefix) cannot be one.
                if !international && digits.starts_with('0') {
                    return Err(
                        "is a national number; write it with its country code (+44 20 7946 0958)".into(),
                    );
                }
                if !(8..=15).contains(&digits.len()) || digits.starts_with('0') {
                    return Err(
                        "is not a phone number with its country code (E.164 has 8 to 15 digits)".into(),
                    );
                }
                Ok(if self == Pii::Phone {
                    format!("+{digits}")
                } else {
                    digits
                })
            }
            Pii::Name => {
                let name: String = lower
                    .chars()
                    .filter(|c| !c.is_ascii_punctuation() && !is_punctuation(*c))
                    .collect();
                let name = name.split_whitespace().collect::<Vec<_>>().join(" ");
                if name.is_empty() {
                    return Err("has no letters".into());
                }
                Ok(name)
            }
            Pii::City | Pii::State => {
                let letters: String = lower.chars().filter(|c| c.is_alphabetic()).collect();
                if letters.is_empty() {
                    return Err("has no letters".into());
                }
                Ok(letters)
            }
            Pii::Zip => {
                let zip: String = lower.chars().filter(|c| !c.is_whitespace()).collect();
                // ZIP+4: the five digits before the dash.
                let zip = match zip.split_once('-') {
                    Some((five, four))
                        if five.len() == 5
                            && five.chars().all(|c| c.is_ascii_digit())
                            && four.chars().all(|c| c.is_ascii_digit()) =>
                    {
                        five.to_string()
                    }
                    _ => zip.replace('-', ""),
                };
                Ok(zip)
            }
            Pii::Country => {
                if lower.len() == 2 && lower.chars().all(|c| c.is_ascii_lowercase()) {
                    Ok(lower)
                } else {
                    Err("is not a two-letter ISO 3166-1 country code (us, de, fr)".into())
                }
            }
            Pii::Gender => match lower.as_str() {
                "f" | "female" | "woman" => Ok("f".into()),
                "m" | "male" | "man" => Ok("m".into()),
                _ => Err("is not f or m (female or male)".into()),
            },
            Pii::DateOfBirth => date_of_birth(&lower),
        }
    }

    /// The lowercase hex SHA-256 of `value` normalised; a value that already is one is kept.
    pub fn hash(self, value: &str) -> Result<String, String> {
        let trimmed = value.trim();
        if is_sha256_hex(trimmed) {
            return Ok(trimmed.to_ascii_lowercase());
        }
        Ok(sha256_hex(self.normalize(value)?.as_bytes()))
    }
}

/// The lowercase hex SHA-256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    crate::secrets::hex(ring::digest::digest(&ring::digest::SHA256, bytes).as_ref())
}

fn is_sha256_hex(text: &str) -> bool {
    text.len() == 64 && text.bytes().all(|b| b.is_ascii_hexdigit())
}

/// Unicode punctuation beyond ASCII (curly quotes, dashes, CJK marks).
fn is_punctuation(c: char) -> bool {
    matches!(
        c,
        '\u{2010}'..='\u{2027}' | '\u{2030}'..='\u{205E}' | '\u{3000}'..='\u{303F}' | '\u{00A1}' | '\u{00BF}' | '\u{00AB}' | '\u{00BB}' | '\u{00B7}'
    )
}

/// `YYYYMMDD` from `YYYY-MM-DD`, `YYYYMMDD`, `YYYY/MM/DD` or the US `M/D/YYYY`.
fn date_of_birth(text: &str) -> Result<String, String> {
    let bad = || "is not a date of birth (YYYY-MM-DD, YYYYMMDD or M/D/YYYY)".to_string();
    let parts: Vec<&str> = text
        .split(|c: char| c == '-' || c == '/' || c == '.' || c.is_whitespace())
        .filter(|p| !p.is_empty())
        .collect();
    let (year, month, day) = match parts.as_slice() {
        [whole] if whole.len() == 8 => (&whole[..4], &whole[4..6], &whole[6..]),
        [year, month, day] if year.len() == 4 => (*year, *month, *day),
        [month, day, year] if year.len() == 4 => (*year, *month, *day),
        _ => return Err(bad()),
    };
    let number = |s: &str| s.parse::<u32>().map_err(|_| bad());
    let (year, month, day) = (number(year)?, number(month)?, number(day)?);
    if chrono::NaiveDate::from_ymd_opt(year as i32, month, day).is_none() || year < 1900 {
        return Err(bad());
    }
    Ok(format!("{year:04}{month:02}{day:02}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Meta's published examples (developers.facebook.com, Conversions API customer information
    /// parameters, and the Custom Audiences guide): input, normalised, hash.
    #[test]
    fn meta_examples_hash_as_meta_publishes_them() {
        for (pii, input, normalised, hash) in [
            (
                Pii::Email,
                "John_Smith@gmail.com",
                "john_smith@gmail.com",
                "62a14e44f765419d10fea99367361a727c12365e2520f32218d505ed9aa0f62f",
            ),
            (
                Pii::PhoneDigits,
                "+1 (650) 555-1212",
                "16505551212",
                "e323ec626319ca94ee8bff2e4c87cf613be6ea19919ed1364124e16807ab3176",
            ),
            (
                Pii::Name,
                "Mary",
                "mary",
                "6915771be1c5aa0c886870b6951b03d7eafc121fea0e80a5ea83beb7c449f4ec",
            ),
            (
                Pii::Name,
                "정",
                "정",
                "8fa8cd9c440be61d0151429310034083132b35975c4bea67fdd74158eb51db14",
            ),
            (
                Pii::Name,
                "Valéry",
                "valéry",
                "08e1996b5dd49e62a4b4c010d44e4345592a863bb9f8e3976219bac29417149c",
            ),
            (
                Pii::DateOfBirth,
                "2/16/1997",
                "19970216",
                "01acdbf6ec7b4f478a225f1a246e5d6767eeab1a7ffa17f025265b5b94f40f0c",
            ),
            (
                Pii::Country,
                "US",
                "us",
                "79adb2a2fce5c6ba215fe5f27f532d4e7edbac4b6a5e09e1ef3a08084a904621",
            ),
            (
                Pii::Email,
                "mary@example.com",
                "mary@example.com",
                "f1904cf1a9d73a55fa5de0ac823c4403ded71afd4c3248d00bdcd0866552bb79",
            ),
            (
                Pii::PhoneDigits,
                "15559876543",
                "15559876543",
                "1ef970831d7963307784fa8688e8fce101a15685d62aa765fed23f3a2c576a4e",
            ),
        ] {
            assert_eq!(pii.normalize(input).as_deref(), Ok(normalised), "{pii:?} {input}");
            assert_eq!(pii.hash(input).as_deref(), Ok(hash), "{pii:?} {input}");
        }
    }

    #[test]
    fn every_field_is_normalised_as_the_platforms_ask() {
        let ok = |pii: Pii, input: &str| pii.normalize(input).unwrap();
        assert_eq!(
            ok(Pii::Email, "  Ada.Lovelace@Example.COM "),
            "ada.lovelace@example.com"
        );
        // Google's formatting guide: Gmail addresses lose dots and `+tag`s, others keep them.
        assert_eq!(
            ok(Pii::GoogleEmail, " Cloudy.SanFrancisco+Shopping@gmail.com"),
            "cloudysanfrancisco@gmail.com"
        );
        assert_eq!(
            ok(Pii::GoogleEmail, "user.name+NYC@Example.com"),
            "user.name+nyc@example.com"
        );
        assert_eq!(
            ok(Pii::Email, "cloudy.sanfrancisco+shopping@gmail.com"),
            "cloudy.sanfrancisco+shopping@gmail.com"
        );
        assert!(Pii::GoogleEmail.normalize("+tag@gmail.com").is_err());
        assert_eq!(ok(Pii::Phone, "+1 (650) 555-1212"), "+16505551212");
        assert_eq!(ok(Pii::Phone, "0044 20 7946 0958"), "+442079460958");
        assert_eq!(ok(Pii::PhoneDigits, "+44 20 7946 0958"), "442079460958");
        assert_eq!(ok(Pii::Name, " O'Brien-Smith "), "obriensmith");
        assert_eq!(ok(Pii::Name, "Mary  Ann"), "mary ann");
        assert_eq!(ok(Pii::City, "New York"), "newyork");
        assert_eq!(ok(Pii::City, "São Paulo"), "sãopaulo");
        assert_eq!(ok(Pii::State, "CA"), "ca");
        assert_eq!(ok(Pii::Zip, "94025-1234"), "94025");
        assert_eq!(ok(Pii::Zip, "M1 1AE"), "m11ae");
        assert_eq!(ok(Pii::Gender, "Female"), "f");
        assert_eq!(ok(Pii::Gender, "M"), "m");
        assert_eq!(ok(Pii::DateOfBirth, "1997-02-16"), "19970216");
        assert_eq!(ok(Pii::DateOfBirth, "19970216"), "19970216");
        assert_eq!(ok(Pii::Plain, " CRM-123 "), "crm-123");
    }

    #[test]
    fn values_that_would_hash_to_no_one_are_refused_without_being_quoted() {
        for (pii, input) in [
            (Pii::Email, "ada.example.com"),
            (Pii::Email, "ada@localhost"),
            (Pii::Phone, "020 7946 0958"),
            (Pii::Phone, "555-1212"),
            (Pii::Phone, "call me"),
            (Pii::Country, "United States"),
            (Pii::Gender, "x"),
            (Pii::DateOfBirth, "1997-02-30"),
            (Pii::DateOfBirth, "yesterday"),
            (Pii::Name, "   "),
            (Pii::City, "123"),
        ] {
            let error = pii.hash(input).unwrap_err();
            assert!(
                !error.contains(input.trim()) || input.trim().is_empty(),
                "{error}"
            );
        }
    }

    #[test]
    fn a_value_already_hashed_is_not_hashed_again() {
        let hashed = "62A14E44F765419D10FEA99367361A727C12365E2520F32218D505ED9AA0F62F";
        assert_eq!(Pii::Email.hash(hashed).unwrap(), hashed.to_lowercase());
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
