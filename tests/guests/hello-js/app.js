// A JavaScript guest (jco + ComponentizeJS): keeps the host honest about non-Python guests.
addEventListener("fetch", (event) => event.respondWith(handle(event.request)));

async function handle(request) {
  const url = new URL(request.url);
  const body = request.method === "POST" ? await request.text() : "";
  const text = `hello from js: ${request.method} ${url.pathname}${url.search} ` +
    `x-test=${request.headers.get("x-test") ?? "-"} body=${body.length}\n`;
  return new Response(text, {
    status: url.pathname === "/teapot" ? 418 : 200,
    headers: { "content-type": "text/plain", "x-guest": "js" },
  });
}
