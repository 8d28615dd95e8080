// The console's live updates. Server-sent events from /console/events
// replace the banners, the overview's counts and changed connection rows
// with HTML the broker rendered (every value escaped by its templates); a
// connection's own page reloads when that connection changes. Without a
// stream (no EventSource, or it keeps failing) the page reloads every 30 s
// instead, but never while a form is being filled in.
(function () {
  'use strict';
  var REFRESH_MS = 30000;
  var editing = false;
  if (!document.getElementById('live-banners')) {
    return;
  }
  document.addEventListener('input', function () { editing = true; });
  function reloadIfIdle() {
    if (!editing) {
      window.location.reload();
    }
  }
  function periodic() {
    document.body.setAttribute('data-live', 'periodic');
    window.setInterval(reloadIfIdle, REFRESH_MS);
  }
  if (!window.EventSource) {
    periodic();
    return;
  }
  var failures = 0;
  var stream;
  function start() {
  stream = new EventSource('/console/events');
  stream.addEventListener('open', function () {
    failures = 0;
    document.body.setAttribute('data-live', 'on');
  });
  stream.addEventListener('error', function () {
    failures += 1;
    document.body.setAttribute('data-live', 'off');
    if (stream.readyState === EventSource.CLOSED || failures >= 3) {
      stream.close();
      periodic();
    }
  });
  stream.addEventListener('frame', function (e) {
    var d = JSON.parse(e.data);
    var banners = document.getElementById('live-banners');
    if (banners) {
      banners.innerHTML = d.banners;
    }
    var counts = document.getElementById('live-counts');
    if (counts) {
      counts.innerHTML = d.counts;
    }
  });
  stream.addEventListener('connection', function (e) {
    var d = JSON.parse(e.data);
    var rows = document.querySelectorAll('tr[data-id]');
    for (var i = 0; i < rows.length; i++) {
      if (rows[i].getAttribute('data-id') === d.id) {
        rows[i].outerHTML = d.row;
      }
    }
    var own = document.querySelector('[data-live-connection]');
    if (own && own.getAttribute('data-live-connection') === d.id) {
      reloadIfIdle();
    }
  });
  }
  // A page left for another keeps no stream open: browsers allow a few
  // connections per host, and pages kept for the back button would hold
  // them while the next page waits. Back on the page, the stream resumes.
  window.addEventListener('pagehide', function () {
    if (stream) {
      stream.close();
    }
  });
  window.addEventListener('pageshow', function (e) {
    if (e.persisted) {
      start();
    }
  });
  start();
}());
