/*
 * The pages' access token, for a pool with a token keyring. The application
 * decides how a page gets it: in the URL fragment (/#token=JWT: a fragment
 * is never sent to the server, so no log sees it) or typed into the page's
 * token field. The page keeps it for the tab (sessionStorage), removes it
 * from the address bar, and sends it as "Authorization: Bearer"; only an
 * EventSource and a <video src>, which cannot send headers, carry it as
 * ?token= (the node accepts that on /events and /results only, and never
 * logs it). Plain ES2017, no build step.
 */
(function () {
  "use strict";

  var KEY = "gridnode-token";
  var token = "";

  function fromFragment() {
    var params = new URLSearchParams(location.hash.replace(/^#/, ""));
    var found = params.get("token");
    if (found === null) return null;
    params.delete("token");
    var rest = params.toString();
    history.replaceState(null, "", location.pathname + location.search + (rest ? "#" + rest : ""));
    return found.trim();
  }

  function remember(value) {
    token = (value || "").trim();
    try {
      if (token) sessionStorage.setItem(KEY, token); else sessionStorage.removeItem(KEY);
    } catch (ignored) { /* storage may be off: the token lives as long as the page */ }
  }

  function stored() {
    try { return sessionStorage.getItem(KEY) || ""; } catch (ignored) { return ""; }
  }

  var fragment = fromFragment();
  remember(fragment !== null ? fragment : stored());

  window.gridnodeToken = {
    /** The token now ("" when none). */
    get: function () { return token; },
    set: remember,
    /** ``headers`` with the Authorization header added when there is a token. */
    headers: function (headers) {
      var h = Object.assign({}, headers || {});
      if (token) h.Authorization = "Bearer " + token;
      return h;
    },
    /** ``url`` with ?token= added, for what cannot send a header (EventSource, <video src>). */
    url: function (url) {
      if (!token) return url;
      return url + (url.indexOf("?") >= 0 ? "&" : "?") + "token=" + encodeURIComponent(token);
    },
    /** Keep the token field (an <input>) and the token in step; ``changed`` is told of edits. */
    bind: function (input, changed) {
      if (!input) return;
      input.value = token;
      input.addEventListener("change", function () {
        remember(input.value);
        if (changed) changed();
      });
    }
  };
}());
