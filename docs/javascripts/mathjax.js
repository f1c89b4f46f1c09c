// MathJax for pymdownx.arithmatex (generic mode), as Material for MkDocs documents it.
window.MathJax = {
  // textmacros: \_ inside \text{...}, as in torch's docstrings (\text{decoupled\_weight\_decay})
  loader: { load: ["[tex]/textmacros"] },
  tex: {
    packages: { "[+]": ["textmacros"] },
    inlineMath: [["\\(", "\\)"]],
    displayMath: [["\\[", "\\]"]],
    processEscapes: true,
    processEnvironments: true
  },
  options: {
    ignoreHtmlClass: ".*|",
    processHtmlClass: "arithmatex"
  }
};

// Typeset again after Material's instant navigation swaps the page.
document$.subscribe(() => {
  MathJax.startup.output.clearCache()
  MathJax.typesetClear()
  MathJax.texReset()
  MathJax.typesetPromise()
})
