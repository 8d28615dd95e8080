// The console's live updates. Server-sent events from /console/events
// replace the banners, the overview's counts and changed connection rows
// with HTML the broker rendered (every value escaped by its templates); a
// connection's own page reloads when that connection changes. Without a
// stream (no EventSource, or it keeps failing) the page reloads every 30 s
// instead. A reload never happens while a form is being filled in, nor once
// nobody has touched the page for 30 minutes: an unattended screen must
// not keep the session from ending.
(function () {
  'use strict';
  var REFRESH_MS = 30000;
  var UNATTENDED_MS = 30 * 60 * 1000;
  var editing = false;
  var touched = Date.now();
  var timer = null;
  var stream = null;
  var failures = 0;
  if (!document.getElementById('live-banners')) {
    return;
  }
  document.addEventListener('input', function () { editing = true; });
  ['keydown', 'pointerdown', 'scroll'].forEach(function (name) {
    document.addEventListener(name, function () { touched = Date.now(); }, { passive: true });
  });
  function reloadIfIdle() {
    if (!editing && Date.now() - touched < UNATTENDED_MS) {
      window.location.reload();
    }
  }
  function periodic() {
    document.body.setAttribute('data-live', 'periodic');
    if (timer === null) {
      timer = window.setInterval(reloadIfIdle, REFRESH_MS);
    }
  }
  function start() {
    if (!window.EventSource) {
      periodic();
      return;
    }
    stream = new EventSource('/console/events');
    stream.addEventListener('open', function () {
      failures = 0;
      if (timer !== null) {
        window.clearInterval(timer);
        timer = null;
      }
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
    // Changes were missed: what the page shows may be old.
    stream.addEventListener('stale', reloadIfIdle);
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
