//! Socket tokens: `B64(claims) + "." + B64(HMAC-SHA256(secret, B64(claims)))` with
//! base64url without padding and claims `{"user_id":"<id>","iat":<unix seconds>}`.

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine;
use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

/// How long a token stays valid, in seconds.
pub const MAX_AGE_SECS: u64 = 86_400;

/// Why a token was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    /// Not two base64url parts, or the claims are not the expected JSON.
    #[error("malformed token")]
    Malformed,
    /// The signature does not match the secret.
    #[error("bad signature")]
    BadSignature,
    /// Older than the maximum age, or issued in the future.
    #[error("expired token")]
    Expired,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct Claims {
    user_id: String,
    iat: u64,
}

fn mac(secret: &[u8], data: &[u8]) -> Hmac<Sha256> {
    let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes any key length");
    mac.update(data);
    mac
}

/// Signs a token for `user_id`, issued at `iat` (unix seconds).
///
/// ```
/// use ringcast::proto::token;
/// let t = token::sign(b"s3cret", "42", 1_700_000_000);
/// assert_eq!(token::verify(b"s3cret", &t, 1_700_000_100), Ok("42".to_string()));
/// assert!(token::verify(b"other", &t, 1_700_000_100).is_err());
/// ```
pub fn sign(secret: &[u8], user_id: &str, iat: u64) -> String {
    let claims = serde_json::to_vec(&Claims {
        user_id: user_id.to_string(),
        iat,
    })
    .expect("claims serialize");
    let body = URL_SAFE_NO_PAD.encode(claims);
    let sig = URL_SAFE_NO_PAD.encode(mac(secret, body.as_bytes()).finalize().into_bytes());
    format!("{body}.{sig}")
}

/// Verifies `token` at time `now` (unix seconds) and returns its user id.
pub fn verify(secret: &[u8], token: &str, now: u64) -> Result<String, TokenError> {
    let (body, sig) = token.split_once('.').ok_or(TokenError::Malformed)?;
    let sig = URL_SAFE_NO_PAD.decode(sig).map_err(|_| TokenError::Malformed)?;
    // Constant-time comparison.
    mac(secret, body.as_bytes())
        .verify_slice(&sig)
        .map_err(|_| TokenError::BadSignature)?;
    let claims = URL_SAFE_NO_PAD.decode(body).map_err(|_| TokenError::Malformed)?;
    let claims: Claims = serde_json::from_slice(&claims).map_err(|_| TokenError::Malformed)?;
    // A little clock skew is tolerated for tokens minted on another machine.
    if claims.iat > now + 60 || now.saturating_sub(claims.iat) > MAX_AGE_SECS {
        return Err(TokenError::Expired);
    }
    Ok(claims.user_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn expiry_bounds() {
        let t = sign(b"k", "7", 1000);
        assert_eq!(verify(b"k", &t, 1000 + MAX_AGE_SECS), Ok("7".into()));
        assert_eq!(verify(b"k", &t, 1001 + MAX_AGE_SECS), Err(TokenError::Expired));
        assert_eq!(verify(b"k", &t, 900), Err(TokenError::Expired));
    }

    #[test]
    fn malformed_tokens() {
        for bad in ["", "abc", "a.b.c", "!!.!!", "e30.AAAA"] {
            assert!(verify(b"k", bad, 0).is_err(), "{bad}");
        }
        // Valid signature over claims of the wrong shape.
        let body = URL_SAFE_NO_PAD.encode(br#"{"user_id":42,"iat":1}"#);
        let sig = URL_SAFE_NO_PAD.encode(mac(b"k", body.as_bytes()).finalize().into_bytes());
        assert_eq!(
            verify(b"k", &format!("{body}.{sig}"), 1),
            Err(TokenError::Malformed)
        );
    }

    #[test]
    fn format_matches_the_contract() {
        let t = sign(b"k", "42", 5);
        let (body, _) = t.split_once('.').unwrap();
        assert_eq!(
            URL_SAFE_NO_PAD.decode(body).unwrap(),
            br#"{"user_id":"42","iat":5}"#
        );
        assert!(!t.contains('='));
    }
}
