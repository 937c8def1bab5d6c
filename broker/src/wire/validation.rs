//! Checks on the form of fields that go to a node or an engine as given: artifact URLs, Docker
//! image references and input/output file paths. Each gives a clear error at submit instead of
//! the engine's at run time.

/// Longest `artifact_url` accepted.
pub const MAX_ARTIFACT_URL_BYTES: usize = 2048;

/// Checks an artifact URL's form: `http://` or `https://`, no whitespace, at most
/// [`MAX_ARTIFACT_URL_BYTES`].
pub fn validate_artifact_url(url: &str) -> Result<(), String> {
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(format!(
            "artifact URL {url:?} must start with http:// or https://"
        ));
    }
    if url.len() > MAX_ARTIFACT_URL_BYTES || url.chars().any(char::is_whitespace) {
        return Err(format!(
            "artifact URL must be at most {MAX_ARTIFACT_URL_BYTES} bytes without whitespace"
        ));
    }
    Ok(())
}

/// Longest image reference accepted (Docker's own limit on a name is 255 per component).
pub const MAX_IMAGE_REF_BYTES: usize = 512;

/// Whether `image` is a Docker image reference: `[host[:port]/]path[:tag][@algo:hex]`, the path
/// in lowercase letters, digits and `._-/`, the tag in letters, digits and `._-` (at most 128).
/// It goes to the engine, never to a shell; this check gives a clear error at submit instead of
/// the engine's at run time.
pub fn valid_image_ref(image: &str) -> bool {
    if image.is_empty() || image.len() > MAX_IMAGE_REF_BYTES {
        return false;
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let Some((algo, hex)) = digest.split_once(':') else {
            return false;
        };
        if algo.is_empty()
            || !algo
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit())
            || hex.len() < 32
            || !hex.bytes().all(|b| b.is_ascii_hexdigit())
        {
            return false;
        }
    }
    // A ':' after the last '/' starts the tag; one before it is a registry port.
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].find(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag
        && (tag.is_empty()
            || tag.len() > 128
            || !tag
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-')))
    {
        return false;
    }
    let mut components = name.split('/');
    let first = components.next().unwrap_or_default();
    let host_like = name.contains('/') && (first.contains('.') || first.contains(':'));
    let component_ok = |c: &str, port_allowed: bool| {
        !c.is_empty()
            && c.bytes().next().is_some_and(|b| b.is_ascii_alphanumeric())
            && c.bytes().all(|b| {
                b.is_ascii_lowercase()
                    || b.is_ascii_digit()
                    || matches!(b, b'.' | b'_' | b'-')
                    || (port_allowed && b == b':')
            })
    };
    component_ok(first, host_like) && components.all(|c| component_ok(c, false))
}

/// Whether `path` is an acceptable input/output file name: relative, `/`-separated, without
/// `.`/`..`/empty segments or NUL, at most 255 bytes.
pub fn valid_file_path(path: &str) -> bool {
    !path.is_empty()
        && path.len() <= 255
        && !path.contains('\0')
        && !path.contains('\\')
        && path
            .split('/')
            .all(|segment| !segment.is_empty() && segment != "." && segment != "..")
}
