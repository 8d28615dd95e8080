//! OpenAPI 3 documents built from the same route tables that build the
//! routers, so a route cannot exist without being documented (and the other
//! way round). Each route says its method, path, summary, whether it needs
//! the key, and its success status; path parameters come from the path.

use axum::routing::MethodRouter;
use serde_json::{json, Map, Value};

/// One documented route.
#[derive(Debug, Clone)]
pub struct RouteDoc {
    /// `GET`, `POST`, ...
    pub method: &'static str,
    /// Axum path (`/connections/{id}`).
    pub path: String,
    /// One line.
    pub summary: &'static str,
    /// Needs the API key (or an agent key, on the gateway).
    pub secured: bool,
    /// Success status.
    pub ok: u16,
    /// What a success answers.
    pub kind: Kind,
    /// The JSON schema of a success body, where it is fixed (else "an object").
    pub body: Option<Value>,
    /// Error statuses worth naming, with when they happen (every route
    /// also documents `default`: the JSON error shape).
    pub errors: Vec<(u16, &'static str)>,
    /// Query parameters: name, whether required, what it is.
    pub query: Vec<(&'static str, bool, &'static str)>,
    /// A JSON request body: `Some(true)` required, `Some(false)` optional,
    /// `None` none. POST, PUT and PATCH require one unless told otherwise.
    pub request_body: Option<bool>,
}

/// The media type of a success.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// A JSON object.
    Json,
    /// An HTML page.
    Html,
    /// A redirect (no body).
    Redirect,
    /// Prometheus text.
    Text,
    /// Newline-delimited JSON, streamed.
    Stream,
    /// Server-sent events (`text/event-stream`).
    EventStream,
    /// A stylesheet.
    Css,
    /// A script.
    Script,
}

/// A route: its document and its handler.
pub type Route<S> = (RouteDoc, MethodRouter<S>);

/// A secured JSON route answering 200.
pub fn doc(method: &'static str, path: &str, summary: &'static str) -> RouteDoc {
    RouteDoc {
        method,
        path: path.to_string(),
        summary,
        secured: true,
        ok: 200,
        kind: Kind::Json,
        body: None,
        errors: Vec::new(),
        query: Vec::new(),
        request_body: matches!(method, "POST" | "PUT" | "PATCH").then_some(true),
    }
}

impl RouteDoc {
    /// The same route, open (no key).
    pub fn open(mut self) -> Self {
        self.secured = false;
        self
    }

    /// The same route with another success status.
    pub fn status(mut self, ok: u16) -> Self {
        self.ok = ok;
        self
    }

    /// The same route answering `kind`.
    pub fn answers(mut self, kind: Kind) -> Self {
        self.kind = kind;
        self
    }

    /// The same route, its success body described by a JSON schema.
    pub fn returns(mut self, schema: Value) -> Self {
        self.body = Some(schema);
        self
    }

    /// The same route with a query parameter.
    pub fn query(mut self, name: &'static str, required: bool, what: &'static str) -> Self {
        self.query.push((name, required, what));
        self
    }

    /// The same route as an OAuth redirect target: open, the authorization
    /// response's query parameters, answering 303.
    pub fn oauth_callback(self) -> Self {
        self.open()
            .query("state", true, "the signed state of the handshake")
            .query("code", false, "the authorization code")
            .query("iss", false, "RFC 9207 issuer")
            .query("error", false, "the provider's error code")
            .query("error_description", false, "the provider's error text")
            .status(303)
            .answers(Kind::Redirect)
    }

    /// The same route taking no request body.
    pub fn no_body(mut self) -> Self {
        self.request_body = None;
        self
    }

    /// The same route taking an optional JSON body.
    pub fn optional_body(mut self) -> Self {
        self.request_body = Some(false);
        self
    }

    /// The same route, naming an error status it answers and when.
    pub fn fails(mut self, status: u16, when: &'static str) -> Self {
        self.errors.push((status, when));
        self
    }
}

/// Adds `routes` to `router`.
pub fn mount<S: Clone + Send + Sync + 'static>(
    mut router: axum::Router<S>,
    routes: Vec<Route<S>>,
) -> axum::Router<S> {
    for (d, r) in routes {
        router = router.route(&d.path, r);
    }
    router
}

/// The OpenAPI 3.0 document of `routes`. `security` names the scheme secured
/// routes use; `schemes` defines it.
pub fn document(
    title: &str,
    description: &str,
    routes: &[RouteDoc],
    security: &str,
    schemes: Value,
) -> Value {
    let mut paths = Map::new();
    for d in routes {
        let mut params: Vec<Value> = d
            .path
            .split('/')
            .filter_map(|seg| seg.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|name| json!({"name": name, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        for (name, required, what) in &d.query {
            params.push(
                json!({"name": name, "in": "query", "required": required, "description": what,
                               "schema": {"type": "string", "minLength": u8::from(*required)}}),
            );
        }
        let success = match d.kind {
            Kind::Json => {
                let schema = d.body.clone().unwrap_or_else(|| json!({"type": "object"}));
                json!({"description": "success", "content": {"application/json": {"schema": schema}}})
            }
            Kind::Html => {
                json!({"description": "an HTML page", "content": {"text/html": {"schema": {"type": "string"}}}})
            }
            Kind::Redirect => {
                json!({"description": "redirect to the return URL", "headers": {"Location": {"schema": {"type": "string"}}}})
            }
            Kind::Text => {
                json!({"description": "Prometheus text format", "content": {"text/plain": {"schema": {"type": "string"}}}})
            }
            Kind::Script => {
                json!({"description": "a script", "content": {"text/javascript": {"schema": {"type": "string"}}}})
            }
            Kind::Css => {
                json!({"description": "a stylesheet", "content": {"text/css": {"schema": {"type": "string"}}}})
            }
            Kind::Stream => {
                json!({"description": "a stream of JSON objects, one per line", "content": {"application/x-ndjson": {"schema": {"type": "string"}}}})
            }
            Kind::EventStream => {
                json!({"description": "server-sent events", "content": {"text/event-stream": {"schema": {"type": "string"}}}})
            }
        };
        let mut op = json!({
            "summary": d.summary,
            "operationId": operation_id(d),
            "responses": {
                d.ok.to_string(): success,
                "default": {"description": "error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
            }
        });
        for (status, when) in &d.errors {
            op["responses"][status.to_string()] = json!({"description": when, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}});
        }
        if !params.is_empty() {
            op["parameters"] = json!(params);
        }
        if d.secured {
            op["security"] = json!([{security: []}]);
        }
        if let Some(required) = d.request_body {
            op["requestBody"] = json!({"required": required, "content": {"application/json": {"schema": {"type": "object"}}}});
        }
        let entry = paths
            .entry(d.path.clone())
            .or_insert_with(|| Value::Object(Map::new()));
        entry[d.method.to_ascii_lowercase()] = op;
    }
    json!({
        "openapi": "3.0.3",
        "info": {"title": title, "description": description, "version": env!("CARGO_PKG_VERSION")},
        "paths": paths,
        "components": {
            "securitySchemes": schemes,
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error", "code", "message"],
                    "properties": {
                        "error": {"type": "string", "description": "machine-readable code"},
                        "code": {"type": "string", "description": "the same code, for clients of the reference's v1 contract"},
                        "message": {"type": "string", "description": "human-readable explanation"}
                    },
                    "additionalProperties": true
                }
            }
        }
    })
}

fn operation_id(d: &RouteDoc) -> String {
    let mut id = d.method.to_ascii_lowercase();
    for seg in d.path.split('/').filter(|s| !s.is_empty()) {
        let seg = seg.trim_start_matches('{').trim_end_matches('}');
        id.push('_');
        id.extend(
            seg.chars()
                .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' }),
        );
    }
    id
}
