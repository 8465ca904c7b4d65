//! The `wasmtime serve` baseline of `scripts/bench-baselines` and `scripts/bench-sweep`:
//! a `wasi:http/incoming-handler` component that reads each request's body to the end
//! and answers `204 No Content` with no body — the same work as the nginx baseline's
//! `return 204`, done by a WebAssembly component instantiated per request.
//!
//! Built for `wasm32-wasip2` by `scripts/build-plugins` (as `http_hello.wasm`); it also
//! compiles for the host so that workspace-wide checks cover it.

use wasi::exports::http::incoming_handler::Guest;
use wasi::http::types::{
    Fields, IncomingBody, IncomingRequest, OutgoingBody, OutgoingResponse, ResponseOutparam,
};
use wasi::io::streams::StreamError;

/// Largest chunk asked of the host per read.
const READ_CHUNK: u64 = 64 * 1024;

struct HttpHello;

impl Guest for HttpHello {
    fn handle(request: IncomingRequest, response_out: ResponseOutparam) {
        // A body that cannot be read fully (the client went away, or it was taken already)
        // is not answered with 204: the benchmark counts only complete exchanges.
        let status = match drain(&request) {
            Ok(_bytes) => 204,
            Err(()) => 400,
        };
        let response = OutgoingResponse::new(Fields::new());
        // 204 and 400 are both valid status codes, so this cannot fail.
        let _ = response.set_status_code(status);
        let Ok(body) = response.body() else {
            return;
        };
        ResponseOutparam::set(response_out, Ok(response));
        // Nothing written: an empty body, finished at once.
        let _ = OutgoingBody::finish(body, None);
    }
}

/// Reads the request body to its end (into guest memory, as a real handler would) and
/// returns how many bytes it held.
fn drain(request: &IncomingRequest) -> Result<u64, ()> {
    let body = request.consume()?;
    let mut total = 0;
    {
        // The stream is a child of the body: it must be dropped before the body is finished.
        let stream = body.stream()?;
        loop {
            match stream.blocking_read(READ_CHUNK) {
                Ok(chunk) => total += chunk.len() as u64,
                Err(StreamError::Closed) => break,
                Err(StreamError::LastOperationFailed(_)) => return Err(()),
            }
        }
    }
    // Trailers are not looked at; finishing the body tells the host it was read to the end.
    drop(IncomingBody::finish(body));
    Ok(total)
}

wasi::http::proxy::export!(HttpHello);
