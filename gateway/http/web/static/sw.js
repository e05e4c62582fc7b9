// The service worker of the web pages: keeps the pages and their files so /khai-bao opens
// without a network, where the personal codes saved in this browser are shown at the door.
// Calls to the gateway (/v1, /web/api, /metrics…) are never cached.
const CACHE = "scangate-pages-v1";
const OFFLINE = [
  "/khai-bao",
  "/static/site.css",
  "/static/icon.svg",
  "/static/js/common.js",
  "/static/js/declare.js",
];

self.addEventListener("install", (event) => {
  event.waitUntil(
    caches.open(CACHE).then((cache) => cache.addAll(OFFLINE)).then(() => self.skipWaiting()),
  );
});

self.addEventListener("activate", (event) => {
  event.waitUntil(
    caches.keys()
      .then((names) => Promise.all(names.filter((n) => n !== CACHE).map((n) => caches.delete(n))))
      .then(() => self.clients.claim()),
  );
});

// Only the pages' own files are kept: never an API answer, a metric or a health check.
const PAGES = new Set(["/", "/khai-bao", "/dang-ky-diem", "/quay", "/truy-vet"]);

function kept(url) {
  return url.origin === self.location.origin
    && (PAGES.has(url.pathname) || url.pathname.startsWith("/static/"));
}

self.addEventListener("fetch", (event) => {
  const url = new URL(event.request.url);
  if (event.request.method !== "GET" || !kept(url)) return;
  // Network first, so a page is never stale while online; the cache when offline.
  event.respondWith(
    fetch(event.request)
      .then((response) => {
        if (response.ok) {
          const copy = response.clone();
          event.waitUntil(caches.open(CACHE).then((cache) => cache.put(event.request, copy)));
        }
        return response;
      })
      .catch(async () => {
        const cached = await caches.match(event.request, { ignoreSearch: true });
        return cached ?? Response.error();
      }),
  );
});
