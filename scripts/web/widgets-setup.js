// Loaded between require.js and the ipywidgets embed manager on pages with widgets (see
// nb_ipywidgets_js in _config.yml). Two adjustments so that widgets render cleanly from
// the book's own files.
(function () {
  "use strict";

  // 1. Where the embed manager's files are. Each module of the bundle finds the font files
  //    its CSS refers to from its own AMD module id ("@jupyter-widgets/controls",
  //    "@jupyter-widgets/html-manager/dist/libembed-amd", …), which require.js resolves
  //    against the page's own folder: wrong for every page. Map those ids so that each
  //    module's folder is the one holding the fonts, next to this script, as an absolute
  //    URL: it holds on every page, over http:// and file:// alike.
  var dist = new URL("html-manager", document.currentScript.src).href;
  window.require.config({
    paths: {
      "@jupyter-widgets/html-manager/dist": dist,
      "@jupyter-widgets": dist,
    },
  });

  // 2. MathJax. ipywidgets 8 typesets widget labels with the MathJax 2 call
  //    MathJax.Hub.Queue(["Typeset", MathJax.Hub, element]) whenever window.MathJax
  //    exists, but the book serves MathJax 3, which has no Hub: every labelled widget
  //    would throw. Give whatever window.MathJax holds (the configuration object before
  //    MathJax loads, MathJax itself after) a Hub whose Queue typesets with MathJax 3.
  var hub = {
    Queue: function (job) {
      var mj = window.MathJax;
      var element = job && job[2];
      if (!mj || typeof mj.typesetPromise !== "function") {
        return; // not loaded yet: MathJax typesets the whole page when it starts
      }
      var ready = (mj.startup && mj.startup.promise) || Promise.resolve();
      ready.then(function () {
        return mj.typesetPromise(element ? [element] : undefined);
      });
    },
  };
  function withHub(value) {
    if (value && typeof value === "object" && !value.Hub) {
      Object.defineProperty(value, "Hub", { value: hub, configurable: true });
    }
    return value;
  }
  if (window.MathJax === undefined) {
    return; // this page does not load MathJax; the widgets skip typesetting
  }
  var current = withHub(window.MathJax);
  Object.defineProperty(window, "MathJax", {
    configurable: true,
    enumerable: true,
    get: function () {
      return current;
    },
    set: function (value) {
      current = withHub(value);
    },
  });
})();
