// Tells the application that opened the connect portal (a popup) or shows
// it in a frame that a connection finished. Sent only to the origins the
// operator allowed (CONNECT_EMBED_ORIGINS): postMessage delivers nothing to
// a window of any other origin.
(function () {
  "use strict";
  var el = document.getElementById("nexus-connect-result");
  if (!el) {
    return;
  }
  var origins = (el.getAttribute("data-origins") || "").split(" ").filter(Boolean);
  var message = {
    type: "nexus:connect",
    status: el.getAttribute("data-status"),
    connection_id: el.getAttribute("data-connection") || null,
    provider: el.getAttribute("data-provider") || null
  };
  var targets = [];
  if (window.opener && window.opener !== window) {
    targets.push(window.opener);
  }
  if (window.parent && window.parent !== window) {
    targets.push(window.parent);
  }
  targets.forEach(function (target) {
    origins.forEach(function (origin) {
      try {
        target.postMessage(message, origin);
      } catch (e) {
        // A closed or navigated-away window: nothing to tell.
      }
    });
  });
})();
