//! Admin upload forms (item imports, reward-model scores): multipart, read as a stream
//! under `Config::max_upload_bytes` with a page-level error past it, so large files
//! need neither a textarea nor a buffer of the whole request before the checks. Plain
//! URL-encoded posts (small pastes, scripts) are accepted as well.

use std::collections::HashMap;

use axum::extract::{FromRequest, Multipart, Request};
use axum::http::header;

use super::{csrf_ok, AppError, AppResult, Ctx};
use crate::error::{invalid, Error};

/// Routes that accept multipart uploads (admins only; checked by the middleware).
pub fn is_upload_route(path: &str) -> bool {
    let Some(rest) = path.strip_prefix("/p/") else {
        return false;
    };
    let Some((id, tail)) = rest.split_once('/') else {
        return false;
    };
    !id.is_empty()
        && id.bytes().all(|b| b.is_ascii_digit())
        && (tail == "import" || tail == "scores")
}

pub fn too_large(bytes: u64, limit: usize) -> Error {
    Error::TooLarge(format!(
        "The upload is {} or more; the limit is {}. Split the file, or import it on the server with `rlhf feedback import` (no size limit).",
        mib(bytes),
        mib(limit as u64)
    ))
}

fn mib(n: u64) -> String {
    format!("{:.1} MiB", n as f64 / (1024.0 * 1024.0))
}

pub struct Upload {
    pub fields: HashMap<String, String>,
    /// (file name, contents) of a non-empty file field.
    pub file: Option<(String, Vec<u8>)>,
}

impl Upload {
    pub fn field(&self, name: &str) -> &str {
        self.fields.get(name).map(String::as_str).unwrap_or("")
    }
}

pub async fn read_upload(ctx: &Ctx, limit: usize, req: Request) -> AppResult<Upload> {
    let multipart = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("multipart/form-data"));
    if !multipart {
        // URL-encoded: the middleware already checked size and CSRF token.
        let bytes = axum::body::to_bytes(req.into_body(), usize::MAX)
            .await
            .map_err(|e| invalid(format!("reading the form: {e}")))?;
        let fields = serde_urlencoded::from_bytes::<Vec<(String, String)>>(&bytes)
            .map_err(|e| invalid(format!("malformed form: {e}")))?;
        return Ok(Upload {
            fields: fields.into_iter().collect(),
            file: None,
        });
    }
    let mut mp = Multipart::from_request(req, &())
        .await
        .map_err(|e| invalid(format!("malformed upload: {e}")))?;
    let bad = |e: axum::extract::multipart::MultipartError| {
        AppError::from(invalid(format!("malformed upload: {e}")))
    };
    let mut up = Upload {
        fields: HashMap::new(),
        file: None,
    };
    let mut total: u64 = 0;
    let mut first = true;
    while let Some(mut field) = mp.next_field().await.map_err(bad)? {
        let name = field.name().unwrap_or("").to_string();
        let file_name = field.file_name().map(str::to_string);
        let mut data = Vec::new();
        while let Some(chunk) = field.chunk().await.map_err(bad)? {
            total += chunk.len() as u64;
            if total > limit as u64 {
                return Err(too_large(total, limit).into());
            }
            data.extend_from_slice(&chunk);
        }
        // Nothing else is looked at before the form proves it came from our page.
        if first {
            if name != "csrf" || !csrf_ok(ctx, &String::from_utf8_lossy(&data)) {
                return Err(AppError::Csrf);
            }
            first = false;
            continue;
        }
        match file_name {
            Some(f) if !f.is_empty() && !data.is_empty() => up.file = Some((f, data)),
            Some(_) => {}
            None => {
                let text = String::from_utf8(data)
                    .map_err(|_| invalid(format!("field {name:?} is not valid UTF-8")))?;
                up.fields.insert(name, text);
            }
        }
    }
    if first {
        return Err(AppError::Csrf);
    }
    Ok(up)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upload_routes() {
        assert!(is_upload_route("/p/12/import"));
        assert!(is_upload_route("/p/1/scores"));
        for p in [
            "/p/x/import",
            "/p//import",
            "/p/1/label",
            "/p/1/import/x",
            "/login",
            "/p/1",
        ] {
            assert!(!is_upload_route(p), "{p}");
        }
    }
}
