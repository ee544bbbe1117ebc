//! The answers the proxy gives itself: 301, 400, 404, 408, 413, 414, 421, 431, 502, 503, 504.

use std::collections::BTreeMap;

fn reason(code: u16) -> &'static str {
    match code {
        301 => "Moved Permanently",
        400 => "Bad Request",
        401 => "Unauthorized",
        404 => "Not Found",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        414 => "URI Too Long",
        421 => "Misdirected Request",
        431 => "Request Header Fields Too Large",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        _ => "Error",
    }
}

fn default_body(code: u16) -> &'static str {
    match code {
        301 => "",
        400 => "The request could not be parsed.\n",
        404 => "No site is configured for this address.\n",
        408 => "The request took too long to arrive.\n",
        413 => "The request body is too large.\n",
        414 => "The request line is too long.\n",
        421 => {
            "This connection cannot serve this site: its certificate does not name it. Connect again for this site.\n"
        }
        431 => "The request headers are too large.\n",
        502 => "The site's server did not answer correctly.\n",
        503 => "The site has no server available right now.\n",
        504 => "The site's server took too long to answer.\n",
        _ => "Error.\n",
    }
}

/// Builds a complete response. `custom` holds per-listener bodies by code; `cluster_503` a
/// per-cluster 503 body.
pub fn render(
    code: u16,
    close: bool,
    request_id: &str,
    location: Option<&str>,
    custom: Option<&BTreeMap<String, String>>,
    cluster_503: Option<&str>,
) -> Vec<u8> {
    let code_text = code.to_string();
    let body = match (code, cluster_503) {
        (503, Some(b)) if !b.is_empty() => b,
        _ => custom
            .and_then(|c| c.get(&code_text))
            .map_or(default_body(code), String::as_str),
    };
    let mut out = format!(
        "HTTP/1.1 {code} {}\r\nContent-Length: {}\r\nContent-Type: text/plain; charset=utf-8\r\nCache-Control: no-cache\r\nConnection: {}\r\n",
        reason(code),
        body.len(),
        if close { "close" } else { "keep-alive" }
    );
    if let Some(location) = location {
        out.push_str("Location: ");
        out.push_str(location);
        out.push_str("\r\n");
    }
    if !request_id.is_empty() {
        out.push_str("X-Request-Id: ");
        out.push_str(request_id);
        out.push_str("\r\n");
    }
    out.push_str("\r\n");
    out.push_str(body);
    out.into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn custom_bodies_override_defaults() {
        let mut custom = BTreeMap::new();
        custom.insert("404".to_string(), "nothing here".to_string());
        let text = String::from_utf8(render(404, false, "abc", None, Some(&custom), None)).unwrap();
        assert!(
            text.starts_with("HTTP/1.1 404 Not Found\r\nContent-Length: 12\r\n"),
            "{text}"
        );
        assert!(text.contains("Connection: keep-alive\r\n"));
        assert!(text.contains("X-Request-Id: abc\r\n"));
        assert!(text.ends_with("\r\n\r\nnothing here"));
        let text = String::from_utf8(render(503, true, "", None, Some(&custom), Some("cluster down"))).unwrap();
        assert!(text.ends_with("cluster down") && text.contains("Connection: close"));
        let text = String::from_utf8(render(301, true, "", Some("https://a.com/x"), None, None)).unwrap();
        assert!(text.contains("Location: https://a.com/x\r\n") && text.contains("Content-Length: 0"));
        let text = String::from_utf8(render(421, false, "", None, None, None)).unwrap();
        assert!(text.starts_with("HTTP/1.1 421 Misdirected Request\r\n"), "{text}");
        custom.insert("421".to_string(), "wrong door".to_string());
        let text = String::from_utf8(render(421, false, "", None, Some(&custom), None)).unwrap();
        assert!(text.ends_with("\r\n\r\nwrong door"), "{text}");
    }
}
