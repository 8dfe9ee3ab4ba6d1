//! A minimal HTTP/1.1 client on tokio, enough for the nodes' JSON routes:
//! keep-alive connections, one request at a time on each, bodies framed by
//! `Content-Length` (actix-web frames every JSON answer so).

use std::collections::HashMap;
use std::io;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

/// An answer: its status and body.
#[derive(Debug)]
pub(crate) struct Response {
    pub(crate) status: u16,
    pub(crate) body: Vec<u8>,
}

/// One keep-alive connection.
struct Connection {
    stream: BufReader<TcpStream>,
    last_used: Instant,
}

/// A connection is opened again past this idle time: actix-web closes idle
/// keep-alive connections after 5 s, and a request written into one it is
/// closing gets no answer, which the client could not tell from a lost one.
const IDLE: Duration = Duration::from_secs(3);

/// Connections by address (`127.0.0.1:port`), one each: a caller sends one
/// request at a time.
#[derive(Default)]
pub(crate) struct Connections {
    open: HashMap<String, Connection>,
}

impl Connections {
    /// Sends `method path` with `body` (JSON) to `base` (`http://host:port`)
    /// and reads the answer. A connection that failed is dropped.
    pub(crate) async fn send(
        &mut self,
        base: &str,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> io::Result<Response> {
        let address = base.trim_start_matches("http://").trim_end_matches('/').to_owned();
        let mut connection = match self.open.remove(&address) {
            Some(connection) if connection.last_used.elapsed() < IDLE => connection,
            _ => Connection {
                stream: BufReader::new(TcpStream::connect(&address).await?),
                last_used: Instant::now(),
            },
        };
        let (response, keep) = exchange(&mut connection.stream, &address, method, path, body).await?;
        if keep {
            connection.last_used = Instant::now();
            self.open.insert(address, connection);
        }
        Ok(response)
    }

    /// Forgets every connection (after a timeout: its answer may still come).
    pub(crate) fn clear(&mut self) {
        self.open.clear();
    }
}

/// Writes one request and reads its answer; also says whether the
/// connection may be used again.
async fn exchange(
    stream: &mut BufReader<TcpStream>,
    host: &str,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> io::Result<(Response, bool)> {
    let body = body.unwrap_or_default();
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {host}\r\nContent-Length: {}\r\n",
        body.len()
    );
    if !body.is_empty() {
        request.push_str("Content-Type: application/json\r\n");
    }
    request.push_str("\r\n");
    let mut bytes = request.into_bytes();
    bytes.extend_from_slice(body);
    stream.get_mut().write_all(&bytes).await?;

    let mut line = String::new();
    if stream.read_line(&mut line).await? == 0 {
        return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed before an answer"));
    }
    let status = line
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse::<u16>().ok())
        .ok_or_else(|| invalid(format!("not a status line: {line:?}")))?;
    let mut length = None;
    let mut keep = true;
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(io::Error::new(
                io::ErrorKind::UnexpectedEof,
                "closed inside the headers",
            ));
        }
        let header = line.trim_end();
        if header.is_empty() {
            break;
        }
        let Some((name, value)) = header.split_once(':') else {
            continue;
        };
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            length = Some(
                value
                    .parse::<usize>()
                    .map_err(|_| invalid(format!("bad length {value}")))?,
            );
        } else if name.eq_ignore_ascii_case("connection") && value.eq_ignore_ascii_case("close") {
            keep = false;
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            return Err(invalid(format!("unsupported transfer encoding {value}")));
        }
    }
    let mut body = vec![0; length.unwrap_or(0)];
    stream.read_exact(&mut body).await?;
    Ok((Response { status, body }, keep))
}

fn invalid(message: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, message)
}
