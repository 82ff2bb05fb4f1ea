//! Reading an answer's body without letting the far end fill memory.

use crate::error::MAX_ANSWER_BYTES;

/// Reads the body, or `None` once it is known to exceed [`MAX_ANSWER_BYTES`]: from
/// Content-Length before anything is read, else as soon as more has arrived. A loop over
/// `chunk()` because reqwest offers no capped read, and this is all one takes.
pub(crate) async fn read_capped(
    response: &mut reqwest::Response,
) -> Result<Option<Vec<u8>>, reqwest::Error> {
    if response
        .content_length()
        .is_some_and(|length| length > MAX_ANSWER_BYTES as u64)
    {
        return Ok(None);
    }
    let mut body = Vec::new();
    while let Some(chunk) = response.chunk().await? {
        if body.len() + chunk.len() > MAX_ANSWER_BYTES {
            return Ok(None);
        }
        body.extend_from_slice(&chunk);
    }
    Ok(Some(body))
}
